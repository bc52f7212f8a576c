"""End-to-end runs of train.py on real Fashion-MNIST (small subsets): demo smoke run, W&B offline,
DDP simulation, multirun, resume and user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FMNIST = ROOT.parent / "shared" / "datasets" / "fashion-mnist"
pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason=f"needs {FMNIST}")

SMALL = [
    f"data.root={FMNIST}",
    "data.limit_train=1024",
    "data.limit_val=256",
    "data.limit_test=256",
    "trainer.enable_progress_bar=false",
]


def run_train(tmp_path: Path, *overrides: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    e = {**os.environ, "ROBUSTX_ROOT": str(tmp_path), "WANDB_SILENT": "true", **(env or {})}
    e.pop("WANDB_API_KEY", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=tmp_path,
        env=e,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_dirs(tmp_path: Path, kind: str = "runs") -> list[Path]:
    return sorted(p.parent for p in (tmp_path / "logs").glob(f"train/{kind}/**/.hydra"))


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
    from robustx.export import load_model

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


def test_multirun_two_jobs(tmp_path):
    run_train(tmp_path, "-m", "+experiment=demo", "logger=csv", "trainer.max_epochs=1", "method.l_target=1.0,2.0", *SMALL)
    runs = run_dirs(tmp_path, "multiruns")
    assert len(runs) == 2
    targets = sorted(json.loads((r / "metrics.json").read_text())["method"]["l_target"] for r in runs)
    assert targets == [1.0, 2.0]
    assert runs[0].parent == runs[1].parent  # one sweep folder, one subfolder per job


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
    run_train(tmp_path, *common, "callbacks.model_checkpoint.save_top_k=-1")
    (ref,) = run_dirs(tmp_path)
    ckpt = ref / "checkpoints" / "epoch_000.ckpt"
    assert ckpt.is_file()
    run_train(tmp_path, *common, f"ckpt_path={ckpt}")
    (resumed,) = [r for r in run_dirs(tmp_path) if r != ref]
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


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.z=0", "method.z must be > 0"),
        ("method.adversarial.eps=-1", "adversarial eps must be >= 0"),
        ("+method.lambda=3", "Unknown method option"),
        ("ckpt_path=/nonexistent/last.ckpt", "does not exist"),
        ("data.root=/nonexistent", "Fashion-MNIST not found"),
    ],
)
def test_user_errors_are_one_line(tmp_path, override, message):
    args = ["+experiment=demo", "logger=csv", *SMALL, override]
    proc = run_train(tmp_path, *args, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    assert message in out
    assert "Traceback" not in out


def test_ara_callback_logs_to_wandb_offline(tmp_path):
    run_train(
        tmp_path, "+experiment=demo", "trainer.max_epochs=1", *SMALL, "callbacks=ara",
        "callbacks.ara_evaluation.every_n_epochs=1", "callbacks.ara_evaluation.num_images=16",
        "callbacks.ara_evaluation.steps=10", "callbacks.ara_evaluation.final_num_images=16",
        "callbacks.ara_evaluation.final_steps=20", "callbacks.ara_evaluation.bootstrap=50",
        "callbacks.ara_evaluation.batch_size=8", env={"WANDB_MODE": ""},
    )
    (run,) = run_dirs(tmp_path)
    periodic = json.loads((run / "ara_epoch000.json").read_text())
    final = json.loads((run / "ara_final.json").read_text())
    assert periodic["settings"]["steps"] == 10 and final["settings"]["steps"] == 20
    assert len(final["r_attack"]) == 16 and final["attack/ara"] >= 0
    assert "val/ara_attack" in json.loads((run / "metrics.json").read_text())["metrics"]
    log = (run / "train.log").read_text()
    assert "ARA epoch000 (16 images, 10 steps)" in log and " s/image)" in log
    (wandb_run,) = list((run / "wandb").glob("offline-run-*"))
    assert list(wandb_run.glob("*.wandb"))
