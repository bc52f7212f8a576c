"""Faults injected into real runs: a disk that fills up, a diverging fit, a DDP rank that dies or stalls.

Each must end in one line that names the cause and the way on, keep the previous good files, and
leave a run that resumes. The long soak with random kills is scripts/fault_soak.py (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import needs_fmnist, run_script
from tests.paths import FMNIST, ROOT

pytestmark = needs_fmnist

SMALL = [f"data.root={FMNIST}", "data.limit_val=256", "data.limit_test=256", "trainer.enable_progress_bar=false",
         "logger=csv", "test=false"]


def _env(tmp_path: Path) -> dict:
    e = {**os.environ, "ROBUSTX_ROOT": str(tmp_path), "WANDB_SILENT": "true"}
    e.pop("WANDB_API_KEY", None)
    return e


def _errors(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if "][ERROR]" in ln]


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*.tmp")]


def test_disk_full_during_a_checkpoint_keeps_the_last_one_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    args = ["+experiment=demo", *SMALL, "data.limit_train=4096", "trainer.max_epochs=2", f"hydra.run.dir={run}"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    # The disk "fills up" now: writes past 64 KB fail (EFBIG, as ENOSPC would); logs and CSV rows still fit.
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (64_000, resource.RLIM_INFINITY))
    good = last.read_bytes()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    (err,) = _errors(out)
    assert f"disk full while writing {run / 'checkpoints'}" in err and f"resume with ckpt_path={last}" in err
    assert last.read_bytes() == good and _no_temp_files(run)  # the previous checkpoint is whole, no partial file left
    assert torch.load(last, weights_only=True)["epoch"] == 0
    # Space is back: the same command with ckpt_path finishes the run.
    run_script("train.py", tmp_path, *args[:-1], f"hydra.run.dir={tmp_path / 'resumed'}", f"ckpt_path={last}",
               env={"WANDB_SILENT": "true"})
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["global_steps"] == 2 * torch.load(last, weights_only=True)["global_step"]


def _limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


@pytest.mark.slow
def test_disk_full_during_evaluation_keeps_the_cache_and_the_rerun_resumes(tmp_path):
    from robustx.io.export import save_model
    from robustx.models import SmallCNN

    torch.manual_seed(0)
    ckpt = save_model(SmallCNN(channels=(8, 8, 8), hidden=16), tmp_path / "m.safetensors",
                      model_config={"_target_": "robustx.models.SmallCNN", "channels": [8, 8, 8], "hidden": 16})
    args = [str(ROOT / "eval.py"), f"ckpt={ckpt}", "data=fashion_mnist", f"data.root={FMNIST}", "ara.protocol=cheap", "ara.steps=12",
            "ara.num_images=16", "ara.batch_size=8", "ara.bootstrap=50", "cross_check.attacks=[alma]",
            "cross_check.steps=30", "fixed_radius.version=none", "ara.bf16=false", "ara.compile=false"]
    # 20 KB: the per-batch cache files and logs fit, the curves PNG does not.
    proc = subprocess.run([sys.executable, *args, "hydra.run.dir=out1"], cwd=tmp_path, env=_env(tmp_path), text=True,
                          capture_output=True, preexec_fn=_limit_file_size(20_000), timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    (err,) = _errors(out)
    assert "disk full while writing" in err and ".png" in err and "rerun the same command" in err
    cache = tmp_path / "logs" / "eval_cache"
    assert len(list(cache.glob("*/*.json"))) == 6 and _no_temp_files(tmp_path)  # 2 batches x (2 criteria, ALMA)
    proc = run_script("eval.py", tmp_path, *args[1:], "hydra.run.dir=out2")
    assert "resumed 2 of 2 batches" in proc.stdout + proc.stderr
    res = json.loads((tmp_path / "out2" / "m.json").read_text())
    assert len(res["attack"]["r"]) == 16 and (tmp_path / "out2" / "m.png").is_file()


def test_a_diverging_run_stops_in_one_line_and_exports_nothing(tmp_path):
    proc = run_script("train.py", tmp_path, "+experiment=demo", *SMALL, "data.limit_train=512", "optim.lr=1e12",
                      f"hydra.run.dir={tmp_path / 'run'}", env={"WANDB_SILENT": "true"}, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    (err,) = _errors(out)
    assert "TrainingDiverged: training diverged at step" in err and "lower optim.lr" in err and "on_nonfinite=skip" in err
    assert not list(tmp_path.rglob("model.safetensors")) and not list(tmp_path.rglob("*.ckpt"))


def _ranks(main: subprocess.Popen) -> dict[int, int]:
    """{local rank: pid} of a ddp_sim run (rank 0 is the launched process, rank 1 its child)."""
    ranks = {0: main.pid}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                env = (p / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"LOCAL_RANK=1" in env and str(main.pid).encode() in (p / "stat").read_bytes().split()[3:4]:
                ranks[1] = int(p.name)
    return ranks


@pytest.mark.slow
@pytest.mark.parametrize("victim, sig", [(1, signal.SIGKILL), (0, signal.SIGKILL), (1, signal.SIGSTOP)])
def test_a_dead_or_stalled_ddp_rank_stops_the_other_in_bounded_time(tmp_path, victim, sig):
    run = tmp_path / "run"
    args = ["+experiment=demo", *SMALL, "data.limit_train=4096", "trainer.max_epochs=3", "trainer=ddp_sim",
            "trainer.strategy.timeout.seconds=20", f"hydra.run.dir={run}"]
    main = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").is_file() and main.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    ranks = _ranks(main)
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[victim], sig)
    survivor = ranks[1 - victim]
    start = time.time()
    while Path(f"/proc/{survivor}").exists() and time.time() - start < 120:
        if survivor == main.pid and main.poll() is not None:
            break
        try:  # a child that exited is a zombie until its parent reaps it
            if Path(f"/proc/{survivor}/stat").read_text().split()[2] == "Z":
                break
        except OSError:
            break
        time.sleep(0.5)
    waited = time.time() - start
    for pid in ranks.values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    out, _ = main.communicate(timeout=60)
    assert waited < (20 + 30 if sig == signal.SIGSTOP else 30), f"survivor still running after {waited:.0f} s"
    errors = _errors(out)
    assert len(errors) == 1 and "another DDP process died or stalled" in errors[0], out[-3000:]
    assert f"rank {1 - victim}:" in errors[0] and f"resume with ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in errors[0]
    assert "Traceback" not in out and _no_temp_files(run)
    torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # whole
