"""End-to-end runs of train.py on real Fashion-MNIST (small subsets): demo smoke run, W&B offline,
DDP simulation, multirun, resume and user errors."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import needs_fmnist, run_script
from tests.paths import CONF, FMNIST

pytestmark = needs_fmnist

SMALL = [
    f"data.root={FMNIST}",
    "data.limit_train=1024",
    "data.limit_val=256",
    "data.limit_test=256",
    "trainer.enable_progress_bar=false",
]


def run_train(tmp_path: Path, *overrides: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run_script("train.py", tmp_path, *overrides, env={"WANDB_SILENT": "true", **(env or {})}, check=check)


def run_dirs(tmp_path: Path, kind: str = "runs") -> list[Path]:
    return sorted(p.parent for p in (tmp_path / "logs").glob(f"train/{kind}/**/.hydra"))


def test_logger_none_trains_and_writes_metrics(tmp_path):
    """logger=none works with the default callbacks (LearningRateMonitor refuses a Trainer without logger: it is left out)."""
    run_train(tmp_path, "+experiment=demo", "logger=none", "trainer.max_epochs=1", "test=false", *SMALL, "data.limit_train=256")
    (run,) = run_dirs(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert "val/acc" in metrics["metrics"] and metrics["metrics"]["lr-SGD"] > 0, metrics["metrics"]
    assert (run / "model.safetensors").is_file()


def test_demo_smoke_with_wandb_offline(tmp_path):
    proc = run_train(tmp_path, "+experiment=demo", "trainer.max_epochs=1", *SMALL, "data.limit_train=2048", env={"WANDB_MODE": ""})
    out = proc.stdout + proc.stderr
    assert "logging offline" in out
    (run,) = run_dirs(tmp_path)
    result = json.loads((run / "metrics.json").read_text())
    assert result["metrics"]["val/acc"] > 0.3  # chance is 0.1
    assert result["method"]["name"] == "robust" and result["psi"] >= 220.0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "wandb").glob("offline-run-*"))
    from robustx.io.export import load_model

    model, meta = load_model(run / "model.safetensors")
    assert meta["model_config"]["activation"] == "hhrelu"
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_ddp_sim_ranks_share_psi(tmp_path):
    # l_target above the CE makes the integrator move, so psi differs unless CE is all-reduced.
    # The fused double-backprop kernels (compiled in each rank) ride along: they must work under DDP too.
    run_train(tmp_path, "+experiment=demo", "trainer=ddp_sim", "logger=csv", "trainer.max_epochs=1", "method.l_target=3.0",
              "method.penalty_impl=double_backprop_fused", *SMALL)
    (run,) = run_dirs(tmp_path)
    states = [json.loads((run / f"rank{r}_state.json").read_text()) for r in (0, 1)]
    assert states[0]["psi_integral"] > 0
    assert states[0]["psi"] == states[1]["psi"]
    assert states[0]["global_step"] == states[1]["global_step"] == 4  # 1024 images / 2 ranks / 128


def test_multirun_two_jobs_one_wandb_run_each(tmp_path):
    # The default logger (W&B, offline): each job gets its own run, named by its overrides, in
    # one group per sweep (Lightning's WandbLogger reused job 0's run for every later job).
    proc = run_train(tmp_path, "-m", "+experiment=demo", "trainer.max_epochs=1", "method.l_target=1.0,2.0", *SMALL,
                     env={"WANDB_MODE": "offline"})
    assert "already in progress" not in proc.stdout + proc.stderr
    runs = run_dirs(tmp_path, "multiruns")
    assert len(runs) == 2
    assert runs[0].parent == runs[1].parent  # one sweep folder, one subfolder per job
    group = f"demo-{runs[0].parent.name}".encode()
    targets = {r: json.loads((r / "metrics.json").read_text())["method"]["l_target"] for r in runs}
    assert sorted(targets.values()) == [1.0, 2.0]
    for r, target in targets.items():
        (wb,) = (r / "wandb").glob("offline-run-*")
        (record,) = wb.glob("run-*.wandb")  # the run's protobuf record log: name, group, config, history
        data = record.read_bytes()
        other = 3.0 - target
        assert group in data and f"method.l_target={target}".encode() in data
        assert f"method.l_target={other}".encode() not in data
        log = (wb / "files" / "output.log").read_text()
        assert "Final metrics" in log and log.count("Final metrics") == 1


def test_multirun_with_ddp_sim(tmp_path):
    run_train(tmp_path, "-m", "+experiment=demo", "trainer=ddp_sim", "logger=csv", "trainer.max_epochs=1", "method.l_target=1.0,3.0", *SMALL)
    runs = run_dirs(tmp_path, "multiruns")
    assert len(runs) == 2
    for r in runs:
        states = [json.loads((r / f"rank{k}_state.json").read_text()) for k in (0, 1)]
        assert states[0]["psi"] == states[1]["psi"]


def test_resume_continues_where_it_stopped(tmp_path):
    # A 2-epoch run keeps its epoch-1 checkpoint: that is what a run killed during epoch 2
    # leaves as last.ckpt. Resuming from it must reproduce the uninterrupted run exactly
    # (weights, psi integrator, data order, optimizer and lr schedule).
    common = ["+experiment=demo", "logger=csv", "test=false", *SMALL, "data.limit_train=512", "trainer.max_epochs=2", "method.l_target=3.0"]
    proc = run_train(tmp_path, *common, "callbacks.model_checkpoint.save_top_k=-1")
    # A fresh run says nothing about resuming (Lightning's OnExceptionCheckpoint made ckpt_path=None mean "last").
    assert "ckpt_path" not in proc.stdout + proc.stderr and "Restoring states" not in proc.stdout + proc.stderr
    (ref,) = run_dirs(tmp_path)
    ckpt = ref / "checkpoints" / "epoch_000.ckpt"
    assert ckpt.is_file()
    # Rerunning into that folder without ckpt_path refuses in one line that says how to resume.
    before = (ref / "metrics.json").read_bytes()
    proc = run_train(tmp_path, *common, f"hydra.run.dir={ref}", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-2000:]
    assert "already holds an earlier run" in out and f"ckpt_path={ref / 'checkpoints' / 'last.ckpt'}" in out
    assert (ref / "metrics.json").read_bytes() == before and run_dirs(tmp_path) == [ref]
    run_train(tmp_path, *common, f"ckpt_path={ckpt}")
    (resumed,) = [r for r in run_dirs(tmp_path) if r != ref]
    # metrics.json: the LR training ended with (8 steps, milestones at steps 7 and 8 -> 0.1 / 100),
    # and a resumed run's seconds per step count only the steps it ran.
    m_ref, m_res = (json.loads((r / "metrics.json").read_text()) for r in (ref, resumed))
    assert m_ref["metrics"]["lr-SGD"] == pytest.approx(1e-3) and m_res["metrics"]["lr-SGD"] == pytest.approx(1e-3)
    assert (m_ref["steps_this_run"], m_res["steps_this_run"], m_res["global_steps"]) == (8, 4, 8)
    assert m_res["seconds_per_step"] == pytest.approx(m_res["train_seconds"] / 4)
    from safetensors.torch import load_file

    a, b = load_file(ref / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    sa = json.loads((ref / "rank0_state.json").read_text())
    sb = json.loads((resumed / "rank0_state.json").read_text())
    assert sa["global_step"] == sb["global_step"] == 8
    assert sa["psi_integral"] > 0
    assert sa["psi_integral"] == pytest.approx(sb["psi_integral"], rel=1e-9)


USER_ERRORS = [
    ("method.z=0", "method.z must be > 0"),
    ("method.adversarial.eps=-1", "adversarial eps must be >= 0"),
    ("+method.lambda=3", "Unknown method option"),
    ("method.eps_worse=nan", "method.eps_worse must be a finite number"),
    ("method.k=inf", "method.k must be a finite number"),
    ("method.adversarial.momentum=1.5", "method.adversarial.momentum must be in [0, 1)"),
    ("ckpt_path=/nonexistent/last.ckpt", "does not exist"),
    ("data.root=/nonexistent", "Fashion-MNIST not found"),
]


@pytest.mark.parametrize("override, message", USER_ERRORS[:-1])  # the last one needs the whole job: through the CLI below
def test_user_errors_are_one_line_in_process(tmp_path, override, message):
    """The job raises a user error (which jobs.cli.run_job turns into one log line, exit 2) with a one-line message."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from jobs.cli import USER_ERRORS as CLI_USER_ERRORS
    from jobs.train import train

    overrides = ["+experiment=demo", "logger=csv", *SMALL, f"paths.output_dir={tmp_path / 'run'}", override]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        with pytest.raises(CLI_USER_ERRORS) as err:
            train(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert message in str(err.value)
    assert "\n" not in str(err.value).strip()


def test_user_error_cli_one_line_exit_2_no_run_folder(tmp_path):
    """One case through the CLI: one line, exit code 2, no traceback, no run folder left behind."""
    override, message = USER_ERRORS[-1]
    args = ["+experiment=demo", "logger=csv", *SMALL, override]
    proc = run_train(tmp_path, *args, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    assert message in out
    assert "Traceback" not in out
    assert run_dirs(tmp_path) == []  # a run that wrote nothing leaves no run folder


def test_ara_callback_logs_to_wandb_offline(tmp_path):
    run_train(
        tmp_path, "+experiment=demo", "trainer.max_epochs=1", *SMALL, "callbacks=ara",
        "callbacks.ara_evaluation.every_n_epochs=1", "callbacks.ara_evaluation.num_images=16",
        "callbacks.ara_evaluation.steps=10", "callbacks.ara_evaluation.final_num_images=16",
        "callbacks.ara_evaluation.final_steps=20", "callbacks.ara_evaluation.bootstrap=50",
        "callbacks.ara_evaluation.batch_size=8", "callbacks.ara_evaluation.threat_models=[{norm: L2, eps: 1.5}]",
        env={"WANDB_MODE": ""},
    )
    (run,) = run_dirs(tmp_path)
    periodic = json.loads((run / "ara_epoch000.json").read_text())
    final = json.loads((run / "ara_final.json").read_text())
    assert periodic["settings"]["steps"] == 10 and final["settings"]["steps"] == 20
    assert len(final["r_attack"]) == 16 and final["attack/ara"] >= 0
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert "val/ara_attack" in metrics
    # the fixed-radius accuracy (AutoAttack quick) on the same images, logged beside the ARA
    assert 0 <= metrics["val/robust_acc_L2_1.5"] <= metrics["val/acc"] + 0.2
    assert set(final["robust_acc"]) == {"L2_1.5"} and final["fixed_radius"] == "quick"
    log = (run / "train.log").read_text()
    assert "robust accuracy (AutoAttack quick) L2_1.5" in log
    assert "ARA epoch000 (16 images, 10 steps)" in log and " s/image)" in log
    (wandb_run,) = list((run / "wandb").glob("offline-run-*"))
    assert list(wandb_run.glob("*.wandb"))


def test_resume_from_a_bad_checkpoint_is_one_line(tmp_path):
    """A truncated, foreign or malicious ckpt_path: one line naming the file (before trainer.fit), no code run."""
    import os
    import pickle

    from jobs.train import _resolve_ckpt

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    (tmp_path / "truncated.ckpt").write_bytes(b"PK\x03\x04garbage")
    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps(Evil()))
    torch.save(3, tmp_path / "int.ckpt")
    for name, message in (("truncated", "is not a readable Lightning checkpoint"), ("evil", "refused by the weights-only loader"),
                          ("int", "is not a Lightning checkpoint (no state_dict)")):
        with pytest.raises(ValueError, match=re.escape(message)) as err:
            _resolve_ckpt(str(tmp_path / f"{name}.ckpt"))
        assert "\n" not in str(err.value) and "weights_only=False" not in str(err.value) and f"{name}.ckpt" in str(err.value)
    assert not (tmp_path / "PWNED").exists()
