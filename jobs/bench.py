"""The benchmark protocol run at the end of a training job (``bench.evaluate=true``): one ``bench.json`` per run.

Every run of a benchmark sweep is measured the same way, on the same images:

* clean accuracy on the whole test split (``trainer.test``, already in the run's metrics);
* on ``bench.num_images`` test images (a fixed subset drawn with the datamodule's ``val_seed``,
  identical for every run): the paper's minimal-perturbation search for both criteria (Attack and
  BTR ARA with bootstrap CIs), the independent attack(s) of ``bench.cross_check`` and the
  per-image minimum ("ensemble" ARA), and the robust accuracy at each RMSE in ``bench.eps``
  (fraction of images whose smallest found misclassifying perturbation exceeds eps, from the
  ensemble r_i and from the paper search alone);
* training seconds, steps and seconds per step from :class:`callbacks.time_budget.TimeBudget`.

``scripts/summarize_runs.py`` collects the ``bench.json`` files of one or more (multi)runs.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from robustx.io.files import atomic_write

log = logging.getLogger(__name__)

DEFAULT_ARA = {"protocol": "paper", "steps": None, "eps": None, "momentum": None, "refine": None, "batch_size": 100,
               "modes": ["attack", "btr"], "clip": False, "bf16": False, "channels_last": False, "bootstrap": 1000}


def _overrides() -> tuple[str, list[str]]:
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        return hc.job.override_dirname, list(hc.overrides.task)
    except Exception:  # noqa: BLE001 - not under a Hydra app (e.g. called from a test)
        return "", []


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's answer where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def evaluate_run(cfg: DictConfig, output_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Run the benchmark protocol on ``output_dir/model.safetensors``; write and return ``bench.json``.

    Args:
        cfg: the job's config (uses ``bench``, ``data``, ``paths``).
        output_dir: the run folder (holds ``model.safetensors`` and ``timing.json``).
        result: what the run wrote to ``metrics.json``.
    """
    from jobs.evaluate import ara_settings, cache_key, cross_check_attacks, evaluate_checkpoint
    from jobs.loading import versions
    from robustx.robustness.ara import robust_accuracy_at

    b = cfg.bench
    model_path = output_dir / "model.safetensors"
    if not model_path.is_file():
        raise FileNotFoundError(f"bench.evaluate needs the exported model {model_path}; keep export=true.")
    ara = {**DEFAULT_ARA, **OmegaConf.to_container(b.get("ara") or {}, resolve=True)}
    ara["num_images"] = int(b.num_images)
    settings = ara_settings(OmegaConf.create({"ara": ara}))
    if b.get("threads"):
        torch.set_num_threads(int(b.threads))
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg["limit_test"] = settings["num_images"]
    dm = hydra.utils.instantiate(data_cfg, _convert_="all")
    dm.prepare_data()
    dm.setup("test")
    ids = list(range(len(dm.test_set)))
    data_key = {k: data_cfg.get(k) for k in ("_target_", "root", "limit_test", "val_seed")}
    cache_dir = None
    if b.get("cache", True):
        cache_dir = Path(cfg.paths.log_dir) / "eval_cache" / cache_key(model_path, settings, data_key)
    cross = cross_check_attacks(b.cross_check) if b.get("cross_check") else None
    t0 = time.time()
    res = evaluate_checkpoint(model_path, dm.test_set, ids, settings, num_classes=int(dm.num_classes), cache_dir=cache_dir,
                              bootstrap=int(ara["bootstrap"]), device="cpu", cross_check=cross)
    eval_wall = time.time() - t0
    assert res is not None  # single process
    eps_list = [float(e) for e in b.get("eps", [])]
    robust_acc: dict[str, dict[str, float]] = {}
    for e in eps_list:
        row = {}
        if "attack" in res:
            row["paper"] = robust_accuracy_at(torch.tensor(res["attack"]["r"]), e)
        if "ensemble" in res:
            row["ensemble"] = robust_accuracy_at(torch.tensor(res["ensemble"]["r"]), e)
        robust_acc[f"{e:g}"] = row
    timing_path = output_dir / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {
        "train_seconds": result.get("train_seconds"), "steps": result.get("global_steps"),
        "seconds_per_step": result.get("seconds_per_step"), "note": "no TimeBudget callback: whole-job seconds"}
    override_dirname, task_overrides = _overrides()
    metrics = result.get("metrics", {})

    def ara_block(key: str) -> dict[str, Any] | None:
        if key not in res:
            return None
        return {k: res[key][k] for k in ("ara", "ara_ci_low", "ara_ci_high", "median_r", "accuracy_at_0", "n") if k in res[key]} | {
            "r": res[key]["r"]}

    out = {
        "experiment": cfg.get("experiment_name"),
        "method": result.get("method"),
        "method_name": (result.get("method") or {}).get("name"),
        "overrides": override_dirname,
        "task_overrides": task_overrides,
        "seed": cfg.get("seed"),
        "budget_minutes": b.get("budget_minutes"),
        "test_acc": metrics.get("test/acc"),
        "val_acc": metrics.get("val/acc"),
        "psi": result.get("psi"),
        "timing": timing,
        "eval": {
            "num_images": res["num_images"],
            "ids_seed": data_cfg.get("val_seed"),
            "accuracy": res["accuracy"],
            "settings": settings,
            "cross_check": {k: {kk: v for kk, v in d.items() if kk != "r"} for k, d in (res.get("cross_check") or {}).items()},
            "attack": ara_block("attack"),
            "btr": ara_block("btr"),
            "ensemble": ara_block("ensemble"),
            "robust_acc": robust_acc,
            "warnings": res.get("warnings", []),
            "search_seconds": res["seconds_by_stage"]["search"],
            "wall_seconds": eval_wall,
        },
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), **versions()},
        "output_dir": str(output_dir),
    }
    atomic_write(output_dir / "bench.json", json.dumps(out, indent=1))
    e = out["eval"]
    log.info(
        "bench: test acc %.4f | attack ARA %.4f | BTR ARA %.4f | ensemble %s | %d steps, %.3f s/step -> %s",
        out["test_acc"] or float("nan"), e["attack"]["ara"] if e["attack"] else float("nan"),
        e["btr"]["ara"] if e["btr"] else float("nan"), f"{e['ensemble']['ara']:.4f}" if e["ensemble"] else "off",
        timing.get("steps") or 0, timing.get("seconds_per_step") or float("nan"), output_dir / "bench.json",
    )
    return out


def scalar_metrics(bench: dict[str, Any]) -> dict[str, float]:
    """Flat ``bench/...`` scalars of a bench.json (for the experiment loggers / W&B)."""
    out: dict[str, float] = {}
    e = bench["eval"]
    for key in ("attack", "btr", "ensemble"):
        if e.get(key):
            for k in ("ara", "ara_ci_low", "ara_ci_high"):
                out[f"bench/{key}_{k}"] = float(e[key][k])
    out["bench/eval_accuracy"] = float(e["accuracy"])
    for eps, row in e["robust_acc"].items():
        for k, v in row.items():
            out[f"bench/robust_acc_{k}@{eps}"] = float(v)
    t = bench["timing"]
    for k in ("train_seconds", "step_seconds", "steps", "seconds_per_step"):
        if t.get(k) is not None:
            out[f"bench/{k}"] = float(t[k])
    return out
