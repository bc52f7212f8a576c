"""Every experiment and group option composes and builds its model and method."""


import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from robustx.models import build_model
from robustx.training.loss import MethodConfig

from tests.paths import CONF

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


def _compose(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _resolve_without_hydra(cfg):
    # ${hydra:...} resolvers need a running app; drop the nodes that use them.
    cfg = OmegaConf.to_container(cfg, resolve=False)
    cfg.pop("hydra", None)
    cfg["paths"]["output_dir"] = "/tmp/out"
    return OmegaConf.create(cfg)


def test_required_experiments_exist():
    required = {
        "demo",
        *(f"fashion_mnist_{m}" for m in ("standard", "robust", "all", "pgd", "trades")),
        *(f"cifar10_{m}" for m in ("standard", "adv", "robust", "all")),
        "imagenet_robust",
        "imagenet_standard",
    }
    assert required <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds(name):
    cfg = _resolve_without_hydra(_compose([f"+experiment={name}"]))
    method = MethodConfig.from_dict(OmegaConf.to_container(cfg.method, resolve=True))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    assert model_cfg["activation"] == method.activation
    if model_cfg["_target_"].endswith("TorchvisionClassifier"):
        model_cfg["num_classes"] = 10  # keep the test light; the class count is checked below
        assert cfg.data.num_classes == 1000
    build_model(model_cfg)
    assert cfg.experiment_name == name


def test_paper_presets():
    robust = _resolve_without_hydra(_compose(["+experiment=cifar10_robust"]))
    m = MethodConfig.from_dict(OmegaConf.to_container(robust.method, resolve=True))
    assert (m.penalty, m.activation, m.adaptive, m.z, m.zeta) == (True, "hhrelu", True, 2.0, 0.2)
    assert (m.psi0, m.k, m.l_target, m.eps_better, m.eps_worse) == (220.0, 0.02, 1.5, 1.0, 0.01)
    assert m.adversarial.kind == "none"
    a = MethodConfig.from_dict(OmegaConf.to_container(_resolve_without_hydra(_compose(["+experiment=cifar10_all"])).method))
    assert (a.penalty, a.adversarial.kind, a.adversarial.eps, a.adversarial.steps, a.adversarial.half_and_half) == (
        True, "l2min", 0.1, 7, True,
    )
    adv = MethodConfig.from_dict(OmegaConf.to_container(_resolve_without_hydra(_compose(["+experiment=cifar10_adv"])).method))
    assert (adv.penalty, adv.adversarial.kind, adv.adversarial.eps) == (False, "l2", 0.01)
    cfg = _resolve_without_hydra(_compose(["+experiment=cifar10_standard"]))
    assert cfg.model.depth == 44 and list(cfg.model.widths) == [16, 32, 64] and cfg.trainer.max_epochs == 200
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 1e-4)
    assert list(cfg.optim.milestones) == [0.85, 0.975]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("adversarial", ["none", "l2", "l2min", "pgd", "trades"])
def test_group_combinations(method, adversarial):
    cfg = _resolve_without_hydra(_compose([f"method={method}", f"adversarial={adversarial}"]))
    m = MethodConfig.from_dict(OmegaConf.to_container(cfg.method, resolve=True))
    assert m.adversarial.kind == adversarial


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "ddp_sim"])
@pytest.mark.parametrize("logger", ["wandb", "csv", "many", "none"])
def test_trainer_and_logger_options(trainer, logger):
    cfg = _compose([f"trainer={trainer}", f"logger={logger}"])
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    if trainer == "ddp_sim":
        assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.strategy) == ("cpu", 2, "ddp")


@pytest.mark.parametrize("search", sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml")))
def test_hparams_search_composes(search):
    cfg = _compose([f"hparams_search={search}", "method=pgd"])
    assert cfg.hydra.sweeper.params


@pytest.mark.parametrize("entry, own, foreign", [
    ("train", ["method:", "optim:", "trainer:", "+experiment:", "demo ", "seed: 1234", "# Resume from a Lightning checkpoint"], []),
    ("eval", ["data:", "ara:", "protocol: paper", "# override the protocol's value", "cross_check:"], ["method:", "optim:", "trainer:", "+experiment:"]),
    ("explain", ["rho: 0.1", "# RMSE budget", "targets:"], ["data:", "method:", "trainer:"]),
    ("study", ["data:", "study:", "manipulation:", "# the first N correctly classified"], ["method:", "trainer:", "+experiment:"]),
])
def test_help_lists_own_groups_and_commented_keys(entry, own, foreign):
    """`<entry>.py --help`: its own config groups with their options, its keys with their comments, nothing else."""
    import subprocess
    import sys

    root = CONF.parent
    proc = subprocess.run([sys.executable, str(root / f"{entry}.py"), "--help"], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert text.startswith(f"{entry}.py: ") and "Usage:" in text
    for s in own:
        assert s in text, (s, text[:3000])
    groups = text.split("Config groups", 1)[-1].split("Keys (", 1)[0]
    for s in foreign:
        assert f"\n  {s}" not in groups, (s, groups)
    assert "== Config ==" not in text and "Powered by Hydra" not in text  # not Hydra's generic dump
