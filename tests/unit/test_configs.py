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
    assert "activation" not in model_cfg  # one route: method.activation, set by RobustClassifier
    model_cfg["activation"] = method.activation
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
    cfg = _resolve_without_hydra(_compose([f"method={method}", f"method/adversarial={adversarial}"]))
    m = MethodConfig.from_dict(OmegaConf.to_container(cfg.method, resolve=True))
    assert m.adversarial.kind == adversarial


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "ddp_sim"])
@pytest.mark.parametrize("logger", ["wandb", "csv", "many", "none"])
def test_trainer_and_logger_options(trainer, logger):
    cfg = _compose([f"trainer={trainer}", f"logger={logger}"])
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    if trainer == "ddp_sim":
        assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.strategy._target_) == ("cpu", 2, "pytorch_lightning.strategies.DDPStrategy")


@pytest.mark.parametrize("search", sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml")))
def test_hparams_search_composes(search, tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTX_ROOT", str(tmp_path))  # the Optuna storage path creates logs/optuna/ there
    cfg = _compose([f"hparams_search={search}", "method=pgd"])
    if search.startswith("optuna"):
        from jobs.cli import register_resolvers

        register_resolvers()  # train.py does this: ${robustx_dir:...} of the SQLite path
        sweeper = cfg.hydra.sweeper
        assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
        assert sweeper.storage.startswith("sqlite:///") and cfg.optimized_metric == "val/ara_btr"
        if search == "optuna":  # the shared settings; each optuna_* option adds its knob
            return
        assert sweeper.study_name == f"default_{search.removeprefix('optuna_')}"
    assert cfg.hydra.sweeper.params


def _yaml_keys(path):
    """A preset's own keys (its defaults list left out), flattened: {"adversarial.eps": 0.1, ...}."""
    own = OmegaConf.to_container(OmegaConf.load(path))
    own.pop("defaults", None)
    flat = {}
    for key, value in own.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def test_presets_carry_only_what_differs_from_the_code_defaults():
    from dataclasses import asdict

    defaults = asdict(MethodConfig())
    flat_defaults = {**{k: v for k, v in defaults.items() if k != "adversarial"},
                     **{f"adversarial.{k}": v for k, v in defaults["adversarial"].items()}}
    presets = [*(CONF / "method").glob("*.yaml"), *(CONF / "method" / "adversarial").glob("*.yaml")]
    assert len(presets) >= 12
    for path in presets:
        prefix = "adversarial." if path.parent.name == "adversarial" else ""
        for key, value in _yaml_keys(path).items():
            if key == "name":
                continue
            assert f"{prefix}{key}" in flat_defaults, f"{path.name}: unknown key {key}"
            # a preset either restates nothing or states a value that differs (kind 'none' is the group's own name)
            if not (prefix and key == "kind"):
                assert value != flat_defaults[f"{prefix}{key}"], f"{path.name}: {key}={value} restates the default"


def test_method_overrides_are_type_checked_by_the_schema():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="method.z"):
        _compose(["method.z=abc"])
    with pytest.raises(ConfigCompositionException, match="method.nope"):
        _compose(["method.nope=1"])
    cfg = _compose(["method=all", "method/adversarial=pgd", "method.adversarial.eps=0.02"])
    m = MethodConfig.from_dict(OmegaConf.to_container(cfg.method))
    assert (m.name, m.penalty, m.adversarial.kind, m.adversarial.eps, m.adversarial.half_and_half, m.adversarial.clip) == (
        "all", True, "pgd", 0.02, True, True)


def test_model_activation_has_one_route():
    from lightning_modules.robust_classifier import RobustClassifier

    model = {"_target_": "robustx.models.SmallCNN", "num_classes": 10, "in_channels": 1}
    assert RobustClassifier(model=model, method={"activation": "hhrelu"}).model_config["activation"] == "hhrelu"
    with pytest.raises(ValueError, match="set method.activation only"):
        RobustClassifier(model={**model, "activation": "relu"}, method={"activation": "hhrelu"})
