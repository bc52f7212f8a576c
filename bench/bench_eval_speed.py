"""Speed of eval.py's standard fixed-radius evaluation + thorough ensemble, against the same attacks run one after another.

    .venv/bin/python bench/bench_eval_speed.py [--images 16] [--ckpt ../shared/reference-checkpoints/resnet44-robust.pt] \
        [--out docs/evaluation/speed_resnet44-robust.json]

Yardstick (what a straightforward script does): eager fp32, every attack on every image, one after
another, each starting from the clean images:

* fixed radius, for each of the dataset's threat models (CIFAR-10: L2 0.5, Linf 8/255):
  APGD-CE, APGD-T, FAB-T and Square (pyautoattack ``AutoAttack(version='standard')``, its
  ``run_standard_evaluation_individual``: each attack on every correctly classified image); an image is
  robust when it is correctly classified and no attack's example is misclassified in fp32 inside
  the radius and the [0, 1] box;
* the ensemble: the paper's search (bench/bench_ara.py's fp32 loop) and adv-lib's DDN, FMN, ALMA
  (1000 steps) and FAB (100) on every image; per image the smallest fp32-misclassified RMSE.

The project: ``jobs.evaluate.evaluate_checkpoint`` exactly as ``eval.py ara.protocol=paper
'ara.modes=[attack]' cross_check.preset=thorough fixed_radius.version=standard cache=false`` runs it
(ara.bf16/channels_last/compile=auto: the fast path where the CPU runs bf16 natively; the AutoAttack
rule of attacking only images still robust; adv-lib attacks only on correctly classified images; every
example re-checked in fp32). Its seconds include torch.compile's compilation in this process, from an
empty on-disk cache unless ``--warm-cache``.

Printed and written to ``--out``: seconds per stage on both sides, the speed-up, the per-image
fixed-radius verdicts that differ, and the median relative difference of the ensemble r_i.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_ara import yardstick as search_yardstick  # noqa: E402  (the fp32 loop of the paper's search)

from jobs.bench import cpu_name  # noqa: E402
from robustx.attacks import rmse  # noqa: E402
from robustx.robustness.ara import PAPER  # noqa: E402
from robustx.robustness.fixed_radius import ROBUSTBENCH_CIFAR10, counts_at_radius  # noqa: E402

log = logging.getLogger("bench_eval_speed")
AA_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
MIN_NORM = {"ddn": 1000, "fmn": 1000, "alma": 1000, "fab": 100}


def yardstick_fixed_radius(model, x, y, *, norm: str, eps: float, seconds: dict) -> torch.Tensor:
    """Each AutoAttack attack on every correctly classified image, fp32 eager -> (N,) robust flags."""
    from pyautoattack import AutoAttack

    with torch.no_grad():
        robust = model(x).argmax(1) == y
    aa = AutoAttack(model, norm=norm, eps=eps, version="standard", seed=0, device=x.device)
    for name in AA_ATTACKS:
        t0 = time.time()
        aa.attacks_to_run = [name]  # what run_standard_evaluation_individual does, timed per attack
        (adv, _), = aa.run_standard_evaluation_individual(x, y, batch_size=len(y)).values()
        adv = adv.detach().float()
        ok, _ = counts_at_radius(model, adv, x, y, norm=norm, eps=eps)
        robust &= ~ok
        seconds[f"{norm} {name}"] = time.time() - t0
        log.info("yardstick %s %s: %.1f s, %d robust so far", norm, name, seconds[f"{norm} {name}"], int(robust.sum()))
    return robust


def yardstick_ensemble(model, x, y, *, seconds: dict) -> torch.Tensor:
    """The paper search and adv-lib's four attacks, each on every image, fp32 eager -> (N,) ensemble r_i (RMSE)."""
    from adv_lib.attacks import alma, ddn, fab, fmn

    with torch.no_grad():
        clean_wrong = model(x).argmax(1) != y
    t0 = time.time()
    rs = [search_yardstick(model, x, y, mode="attack", steps=int(PAPER["steps"]), eps=PAPER["eps"], momentum=PAPER["momentum"])]
    seconds["search"] = time.time() - t0
    log.info("yardstick search: %.1f s", seconds["search"])
    runs = {"ddn": lambda: ddn(model, x, y, steps=MIN_NORM["ddn"], levels=None),
            "fmn": lambda: fmn(model, x, y, norm=2, steps=MIN_NORM["fmn"]),
            "alma": lambda: alma(model, x, y, distance="l2", num_steps=MIN_NORM["alma"], levels=None),
            "fab": lambda: fab(model, x, y, norm=2, n_iter=MIN_NORM["fab"])}
    for name, run in runs.items():
        t0 = time.time()
        adv = run().detach()
        with torch.no_grad():
            ok = model(adv).argmax(1) != y
        rs.append(torch.where(ok, rmse(adv - x), torch.full_like(rs[0], math.inf)))
        seconds[name] = time.time() - t0
        log.info("yardstick %s: %.1f s", name, seconds[name])
    r = torch.stack([r.double() for r in rs]).min(0).values
    return torch.where(clean_wrong, torch.zeros_like(r), r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--ckpt", default=str(ROOT.parent / "shared" / "reference-checkpoints" / "resnet44-robust.pt"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-yardstick", action="store_true", help="time the project path only")
    ap.add_argument("--warm-cache", action="store_true",
                    help="keep torch.compile's on-disk cache (default: a fresh one, so compiling is timed in full)")
    ap.add_argument("--out", default=None, help="JSON with every figure")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if not args.warm_cache:
        # What a first evaluation on a machine pays: inductor's kernels are not on disk yet.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_eval_speed_inductor_")
    from omegaconf import OmegaConf

    from datamodules import CIFAR10DataModule
    from jobs.evaluate import ara_settings, cross_check_attacks, evaluate_checkpoint, fixed_radius_settings
    from jobs.loading import load_classifier
    from robustx.utils import frozen_parameters

    dm = CIFAR10DataModule(root=args.data, limit_test=args.images)
    dm.prepare_data()
    dm.setup("test")
    ids = list(range(len(dm.test_set)))
    x = torch.stack([dm.test_set[i][0] for i in ids])  # (N, 3, 32, 32)
    y = torch.tensor([int(dm.test_set[i][1]) for i in ids])
    eval_cfg = OmegaConf.load(ROOT / "conf" / "eval.yaml")
    eval_cfg.ara.protocol, eval_cfg.ara.modes, eval_cfg.ara.batch_size = "paper", ["attack"], len(ids)
    eval_cfg.ara.num_images = len(ids)
    eval_cfg.fast_attacks = True  # the attacks on the fast path (eval.py fast_attacks=true)
    settings = ara_settings(eval_cfg)
    cross = cross_check_attacks({"preset": "thorough"})
    fixed = fixed_radius_settings({"version": "standard"}, list(ROBUSTBENCH_CIFAR10))

    t0 = time.time()
    res = evaluate_checkpoint(Path(args.ckpt), dm.test_set, ids, settings, num_classes=10, cache_dir=None, bootstrap=0,
                              device="cpu", cross_check=cross, fixed_radius=fixed, name="bench")
    project_s = time.time() - t0
    out = {"command": " ".join(["bench/bench_eval_speed.py", *sys.argv[1:]]), "cpu": cpu_name(), "threads": args.threads,
           "images": len(ids), "compile_cache": "warm" if args.warm_cache else "cold (fresh TORCHINDUCTOR_CACHE_DIR)", "settings": {k: settings[k] for k in ("bf16", "channels_last", "compile", "batch_size")},
           "torch": torch.__version__, "project": {"seconds": project_s, "seconds_by_stage": res["seconds_by_stage"],
           "fixed_radius": [{k: e[k] for k in ("norm", "eps", "robust_accuracy", "attacks", "stretched_fp32", "refined_fp32", "rerun_fp32")}
                            for e in res["fixed_radius"]], "ensemble_ara": res["ensemble"]["ara"]}}
    log.info("project: %.1f s (%s)", project_s, ", ".join(f"{k} {v:.1f}" for k, v in res["seconds_by_stage"].items()))
    if not args.skip_yardstick:
        model, _ = load_classifier(Path(args.ckpt))
        model.eval()
        seconds: dict[str, float] = {}
        t0 = time.time()
        with frozen_parameters(model):
            robust_y = {f"{t['norm']} {t['eps']:.4g}": yardstick_fixed_radius(model, x, y, norm=t["norm"], eps=t["eps"], seconds=seconds)
                        for t in ROBUSTBENCH_CIFAR10}
            r_y = yardstick_ensemble(model, x, y, seconds=seconds)
        yard_s = time.time() - t0
        from robustx.robustness.ara import ara_exact

        r_p = torch.tensor(res["ensemble"]["r"], dtype=torch.float64)
        both = torch.isfinite(r_p) & torch.isfinite(r_y) & (r_y > 0)
        rel = ((r_p[both] - r_y[both]).abs() / r_y[both])
        verdicts = {}
        for e in res["fixed_radius"]:
            key = f"{e['norm']} {e['eps']:.4g}"
            rp = torch.tensor(e["robust"])
            verdicts[key] = {"project_robust": int(rp.sum()), "yardstick_robust": int(robust_y[key].sum()),
                             "differ": (rp != robust_y[key]).nonzero().flatten().tolist()}
        out["yardstick"] = {"seconds": yard_s, "seconds_by_stage": seconds, "ensemble_ara": ara_exact(r_y, 10)}
        out["speedup"] = yard_s / project_s
        out["verdicts"] = verdicts
        out["ensemble_r_median_rel_diff"] = float(rel.median()) if rel.numel() else math.nan
        out["ensemble_r_max_rel_diff"] = float(rel.max()) if rel.numel() else math.nan
        out["ensemble_r_compared"] = int(both.sum())
        log.info("yardstick %.1f s, project %.1f s: %.2fx; verdicts differ on %s; ensemble r_i median rel diff %.3g%% (%d images)",
                 yard_s, project_s, out["speedup"], {k: v["differ"] for k, v in verdicts.items()},
                 100 * out["ensemble_r_median_rel_diff"], out["ensemble_r_compared"])
    print(json.dumps(out, indent=1))
    if args.out:
        from robustx.io.files import atomic_write

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(args.out), json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
