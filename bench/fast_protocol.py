"""Search for a "fast" ARA protocol: candidates against the paper protocol's cached r_i.

    .venv/bin/python bench/fast_protocol.py --net standard --images 100

Reads the paper-protocol r_i of the same images from docs/reference_networks/reference_ara_paper_200/<net>.json
and runs cheaper candidates on the first --images of them; prints per candidate the gradient
evaluations per image (forward-only passes count separately), both ARAs and their relative
difference to the paper protocol on the same images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from robustx.robustness.ara import ara_exact, minimal_perturbation, passes_criterion
from robustx.attacks import rmse

ROOT = Path(__file__).resolve().parents[1]


def bisect(model, x, y, adv, found, mode, steps):
    """Shrink each found perturbation along its own direction to the criterion boundary (forward passes only)."""
    delta = adv - x
    lo = torch.zeros(x.size(0))
    hi = torch.ones(x.size(0))
    with torch.no_grad():
        for _ in range(steps):
            mid = (lo + hi) / 2
            fails = ~passes_criterion(model(x + mid.view(-1, 1, 1, 1) * delta).float(), y, mode)
            hi = torch.where(fails, mid, hi)
            lo = torch.where(fails, lo, mid)
    return torch.where(found, hi * rmse(delta), torch.full_like(hi, float("nan")))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", default="standard")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--candidates", default="t112e20,t112e5,t112e2,t225e20,t225e5")
    ap.add_argument("--bisect", type=int, default=10)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    from datamodules import CIFAR10DataModule
    from robustx.io.legacy import import_reference_checkpoint

    ref = json.loads((ROOT / "docs" / "reference_networks" / "reference_ara_paper_200" / f"resnet44-{args.net}.json").read_text())
    model, _ = import_reference_checkpoint(ROOT.parent / "shared" / "reference-checkpoints" / f"resnet44-{args.net}.pt")
    model.eval()
    dm = CIFAR10DataModule(root=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"), limit_test=200)
    dm.prepare_data()
    dm.setup("test")
    n = args.images
    ids = ref["ids"][:n]
    x = torch.stack([dm.test_set[i][0] for i in ids])
    y = torch.tensor([int(dm.test_set[i][1]) for i in ids])
    print(f"# {args.net}, {n} images, bf16={args.bf16}, {torch.get_num_threads()} threads")
    print("| candidate | mode | grad evals/img | fwd evals/img | s | ARA | paper ARA | rel diff | median r ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cand in args.candidates.split(","):
        steps = int(cand[1:].split("e")[0])
        eps = float(cand.split("e")[1])
        for mode in ("attack", "btr"):
            r_paper = torch.tensor(ref[mode]["r"][:n], dtype=torch.float64)
            t0 = time.time()
            res = minimal_perturbation(model, x, y, mode=mode, steps=steps, eps=eps, momentum=0.9,
                                       autocast_dtype=torch.bfloat16 if args.bf16 else None)
            r = res.r.clone()
            if args.bisect:
                rb = bisect(model, x, y, res.adversarial, res.found & (res.r > 0), mode, args.bisect)
                r = torch.where(torch.isnan(rb), r, torch.minimum(r, rb))
            sec = time.time() - t0
            r = r.double()
            a, ap_ = ara_exact(r, 10), ara_exact(r_paper, 10)
            pos = (r_paper > 0) & (r > 0)
            ratio = (r[pos] / r_paper[pos]).median().item()
            print(f"| T={steps} eps={eps} +bisect{args.bisect} | {mode} | {steps + 1} | {args.bisect + 1} | {sec:.0f} | {a:.5f} | {ap_:.5f} | {(a - ap_) / ap_:+.3f} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
