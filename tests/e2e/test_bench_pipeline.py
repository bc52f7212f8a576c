"""The robustness-per-compute benchmark pipeline (BENCHMARKS.md) end to end: the smoke run and the re-check script.

The smoke run is the published pipeline with a tiny budget and a tiny evaluation: a multirun of
two methods -> bench.json per run -> scripts/summarize_runs.py -> table and PNG. Configs, time
budget and summary tables in process: tests/unit/test_bench_summary.py.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from jobs import summarize_runs
from tests.helpers import needs_fmnist, run_script
from tests.paths import FMNIST, ROOT


@needs_fmnist
def test_bench_smoke_multirun_to_summary(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m", "+experiment=bench_fashion_mnist", "method=standard,robust", "logger=csv", f"data.root={FMNIST}",
        "data.limit_train=2048", "data.limit_val=128", "data.limit_test=256", "bench.budget_minutes=0.1", "callbacks.time_budget.lr_milestones=[0.5]",
        "bench.num_images=20", "bench.ara.steps=20", "bench.ara.eps=2", "bench.ara.batch_size=20", "bench.ara.bootstrap=50",
        "bench.cross_check.steps=20", f"hydra.sweep.dir={sweep}",
    ]
    run_script("train.py", tmp_path, *args, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}, timeout=300)
    files = sorted(sweep.rglob("bench.json"))
    assert len(files) == 2
    for f in files:
        b = json.loads(f.read_text())
        t = b["timing"]
        assert t["stopped_by_budget"] and t["steps"] > 0 and t["seconds_per_step"] > 0 and t["threads"] == 1
        assert 6.0 <= t["train_seconds"] < 40
        assert [c["factor"] for c in t["lr_changes"]] == pytest.approx([0.1])  # the time-based schedule ran
        assert 2.9 < t["lr_changes"][0]["seconds"] < 6.0
        e = b["eval"]
        assert e["num_images"] == 20 and len(e["btr"]["r"]) == 20 and len(e["ensemble"]["r"]) == 20
        assert e["attack"]["ara_ci_low"] <= e["attack"]["ara"] <= e["attack"]["ara_ci_high"]
        assert set(e["robust_acc"]) == {"0.01", "0.02", "0.05"}
        assert 0 <= b["test_acc"] <= 1
    # Same images for every run: the same fixed subset (datamodule seed) of the same size.
    assert len({(json.loads(f.read_text())["eval"]["ids_seed"], json.loads(f.read_text())["eval"]["num_images"]) for f in files}) == 1
    out = tmp_path / "summary"
    assert summarize_runs.main([str(sweep), "--out", str(out), "--reference", str(tmp_path / "missing")]) == 0
    md = (out / "summary.md").read_text()
    assert "| standard |" in md and "| robust |" in md and "BTR ARA" in md
    assert (out / "tradeoff.png").stat().st_size > 10_000
    assert len(json.loads((out / "rows.json").read_text())["rows"]) == 2


def test_recheck_paper_protocol_rejects_non_run_folders(tmp_path):
    script = str(ROOT / "scripts" / "recheck_paper_protocol.sh")
    proc = subprocess.run(["bash", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stdout.strip().startswith("usage:")
    (tmp_path / "bench.json").write_text("{}")  # a run folder needs its exported model too
    proc = subprocess.run(["bash", script, str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "no bench.json + model.safetensors" in proc.stdout and len(proc.stdout.strip().splitlines()) == 1
