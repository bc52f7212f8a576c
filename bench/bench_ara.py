"""Throughput of the paper's minimal-perturbation search (ARA) on resnet44, against a plain fp32 loop.

    .venv/bin/python bench/bench_ara.py [--images 32] [--steps 450] [--ckpt ../shared/reference-checkpoints/resnet44-robust.pt]

The yardstick is a straightforward fp32 eager implementation of the algorithm kept in this file;
the project's paths are robustx.robustness.ara.minimal_perturbation in fp32, with bf16 autocast, and with
bf16 + channels_last, each also with ``compile=True`` (torch.compile; its compilation, timed by a
2-step warm-up call on the same batch, is reported in its own column and not in the search's
seconds), bf16 rows also with 10 fp32 bisection steps ("refine 10") that move each found
perturbation to the fp32 criterion boundary, and the "fast" protocol (T=112, path 2, bisection 10; fp32 and bf16) whose r_i
and ARAs are compared with the paper-protocol yardstick. For each path: image-steps per second (the yardstick's
T steps for every image over the path's seconds), speed-up over the yardstick, the images it searched (the project's
search skips images failing unperturbed, whose r is 0; the yardstick runs them too, their delta staying 0), the
speed-up per searched image-step (the same work on both sides), the median relative difference of r_i to the fp32
yardstick, and both ARAs. Images: the
CIFAR-10 JPEG test split when ../shared is there, else random images.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from robustx.robustness.ara import PROTOCOLS, ara_exact, minimal_perturbation, passes_criterion
from robustx.models import resnet44

ROOT = Path(__file__).resolve().parents[1]

#: name -> (autocast dtype, channels_last, protocol or None for the command line's steps/eps/momentum,
#: torch.compile, bisection steps).
#: The "fast" rows run PROTOCOLS["fast"] (T=112, path 2, bisection 10: about 4x fewer gradient
#: evaluations, not in the paper) and are compared with the paper-protocol yardstick.
PATHS = {
    "robustx fp32": (None, False, None, False, 0),
    "robustx bf16": (torch.bfloat16, False, None, False, 0),
    "robustx bf16 + channels_last": (torch.bfloat16, True, None, False, 0),
    "robustx bf16 + channels_last + refine 10": (torch.bfloat16, True, None, False, 10),
    "robustx fp32 + compile": (None, False, None, True, 0),
    "robustx bf16 + channels_last + compile": (torch.bfloat16, True, None, True, 0),
    "robustx bf16 + channels_last + compile + refine 10": (torch.bfloat16, True, None, True, 10),
    "robustx fast fp32": (None, False, "fast", False, None),
    "robustx fast bf16": (torch.bfloat16, False, "fast", False, None),
}


def yardstick(model, x, y, *, mode, steps, eps, momentum):
    """Plain fp32 loop of the paper's search (the reference implementation for speed)."""
    delta = torch.zeros_like(x, requires_grad=True)
    mom = torch.zeros_like(x)
    best = torch.full((x.size(0),), math.inf)
    total = steps * (steps + 1) / 2
    for t in range(steps):
        logits = model(x + delta)
        loss = F.cross_entropy(logits, y, reduction="sum")
        (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            if mode == "attack":
                passes = logits.argmax(1) == y
            else:
                passes = logits.softmax(1).gather(1, y[:, None])[:, 0] > 1 / logits.size(1)
            r = delta.pow(2).flatten(1).mean(1).sqrt()
            best = torch.where(~passes & (r < best), r, best)
            d = torch.where(passes.view(-1, 1, 1, 1), g, -delta)
            d = d / (1e-8 + d.pow(2).flatten(1).mean(1).sqrt().view(-1, 1, 1, 1))
            mom = momentum * mom + (1 - momentum) * d
            delta += eps * (steps - t) / total * mom
    return best


def load(args):
    if args.ckpt and Path(args.ckpt).is_file():
        from robustx.io.legacy import import_reference_checkpoint

        model, _ = import_reference_checkpoint(args.ckpt)
    else:
        torch.manual_seed(0)
        model = resnet44(activation="hhrelu").eval()
    tar = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"
    if tar.is_dir():
        from datamodules import CIFAR10DataModule

        dm = CIFAR10DataModule(root=str(tar), limit_test=args.images)
        dm.prepare_data()
        dm.setup("test")
        x = torch.stack([dm.test_set[i][0] for i in range(args.images)])
        y = torch.tensor([int(dm.test_set[i][1]) for i in range(args.images)])
    else:
        x, y = torch.rand(args.images, 3, 32, 32), torch.randint(10, (args.images,))
    return model.eval(), x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--eps", type=float, default=20.0)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--ckpt", default=str(ROOT.parent / "shared" / "reference-checkpoints" / "resnet44-robust.pt"))
    ap.add_argument("--paths", nargs="+", default=list(PATHS), help="subset of: %(default)s")
    ap.add_argument("--modes", nargs="+", default=["attack", "btr"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = sorted(set(args.paths) - set(PATHS))
    if unknown:
        ap.error(f"unknown path(s) {unknown}; choose from {list(PATHS)}")
    model, x, y = load(args)
    kw = dict(steps=args.steps, eps=args.eps, momentum=args.momentum)
    print(f"# ARA search, resnet44 ({Path(args.ckpt).name if Path(args.ckpt).is_file() else 'random init'}), "
          f"{args.images} images, {args.steps} steps, {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}")
    print("| path | mode | s | image-steps/s | x yardstick | searched | x yardstick per searched image-step "
          "| median rel. diff r vs fp32 | ARA | ARA rel. diff | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        with torch.no_grad():  # the project's search skips images failing unperturbed (r = 0)
            searched = int(passes_criterion(model(x), y, mode).sum())
        t0 = time.perf_counter()
        r_ref = yardstick(model, x, y, mode=mode, **kw)
        base = time.perf_counter() - t0
        r_ref = torch.where(torch.isfinite(r_ref), r_ref, torch.zeros_like(r_ref))
        ara_ref = ara_exact(r_ref, 10)
        print(f"| yardstick fp32 loop | {mode} | {base:.1f} | {args.images * args.steps / base:.1f} | 1.00 | {args.images} | 1.00 "
              f"| - | {ara_ref:.5f} | - | - |",
              flush=True)
        for name in args.paths:
            dtype, cl, proto, comp, refine = PATHS[name]
            pkw = dict(kw) if proto is None else {k: v for k, v in PROTOCOLS[proto].items()}
            if refine is not None:
                pkw["refine"] = refine
            m = model.to(memory_format=torch.channels_last) if cl else model.to(memory_format=torch.contiguous_format)
            xi = x.contiguous(memory_format=torch.channels_last) if cl else x.contiguous()
            warm = "-"
            if comp:
                t0 = time.perf_counter()
                minimal_perturbation(m, xi, y, mode=mode, autocast_dtype=dtype, compile=True, **{**pkw, "steps": 2})
                warm = f"{time.perf_counter() - t0:.1f}"
            t0 = time.perf_counter()
            res = minimal_perturbation(m, xi, y, mode=mode, autocast_dtype=dtype, compile=comp, **pkw)
            sec = time.perf_counter() - t0
            both = (r_ref > 0) & (res.r > 0)
            rel = ((res.r - r_ref).abs() / r_ref.clamp(min=1e-12))[both].median().item() if both.any() else 0.0
            ara = ara_exact(res.r, 10)
            # Per searched image-step: the yardstick's seconds per image-step over this path's.
            per_step = (base / (args.images * args.steps)) / (sec / (searched * pkw["steps"])) if searched else float("nan")
            print(f"| {name} | {mode} | {sec:.1f} | {args.images * pkw['steps'] / sec:.1f} | {base / sec:.2f} | {searched} | {per_step:.2f} "
                  f"| {rel:.4f} | {ara:.5f} | {abs(ara - ara_ref) / max(ara_ref, 1e-12):.4f} | {warm} |",
                  flush=True)
        model = model.to(memory_format=torch.contiguous_format)


if __name__ == "__main__":
    main()
