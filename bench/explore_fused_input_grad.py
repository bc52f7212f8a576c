"""Exploration: one compiled graph for the engine's forward + input gradient (torch.func), with inductor freezing.

    .venv/bin/python bench/explore_fused_input_grad.py [--batch 100 12] [--repeats 5] [--threads 2] [--variants ...]

The attack engine (ARA search, adversarial explanations) needs, per step, the logits and the
input gradient of a summed cross-entropy on a model in eval mode with frozen weights. The project
compiles ``model(x)`` (robustx.compiled) and lets autograd run the compiled backward. Variants:

* ``eager fp32``: model(x) + torch.autograd.grad (the yardstick's arithmetic);
* ``project: bf16 + cl + compile``: the project's current fast path;
* ``func: bf16 + cl + compile``: ``torch.func.grad_and_value`` of the loss, compiled as one
  forward-only graph under ``torch.no_grad`` (inductor sees no autograd);
* ``func + freezing``: the same with ``torch._inductor.config.freezing = True`` (weights become
  constants: eval-mode BatchNorm folded, oneDNN weight prepacking). Only valid while the weights
  do not change.
* ``func ... nchw``: the func variants in the contiguous (NCHW) memory format instead of channels_last;
* ``... + cpp_wrapper`` (any variant): ``torch._inductor.config.cpp_wrapper = True``, the code that
  launches the kernels is generated as C++ instead of Python (less overhead per kernel call).

Prints seconds per call (median of --repeats after warm-ups), the speed-up over eager fp32 and
the max relative difference of the input gradient to eager fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from robustx.compiled import compiled_forward  # noqa: E402
from robustx.utils import frozen_parameters  # noqa: E402


def load(ckpt: str | None):
    if ckpt:
        from robustx.io.legacy import import_reference_checkpoint

        model, _ = import_reference_checkpoint(ckpt)
    else:
        from robustx.models import resnet44

        model = resnet44(num_classes=10)
    return model.eval()


def timed(fn, repeats: int, warmup: int):
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), first, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", default=str(ROOT.parent / "shared/reference-checkpoints/resnet44-robust.pt"))
    p.add_argument("--batch", type=int, nargs="+", default=[100, 12])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["eager fp32", "project", "func", "func + freezing"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load(args.ckpt if Path(args.ckpt).exists() else None)
    print(f"# torch {torch.__version__}, threads {args.threads}, command: {' '.join(sys.argv)}")
    print("| batch | variant | s/call | x eager fp32 | first call s | max rel. grad diff |")
    print("|---|---|---|---|---|---|")
    for b in args.batch:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(b, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (b,), generator=g)

        def eager():
            xx = x.clone().requires_grad_(True)
            logits = model(xx)
            (gr,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xx)
            return gr

        def loss_fn(xx, yy):
            logits = model(xx)
            return F.cross_entropy(logits.float(), yy, reduction="sum"), logits

        fused = torch.func.grad_and_value(loss_fn, has_aux=True)
        results = {}
        for variant in args.variants:
            torch._dynamo.reset()
            torch._inductor.config.freezing = "freezing" in variant
            torch._inductor.config.cpp_wrapper = "cpp_wrapper" in variant
            model.to(memory_format=torch.contiguous_format)
            if variant == "eager fp32":
                fn = eager
            elif variant.startswith("project"):
                model.to(memory_format=torch.channels_last)
                net = compiled_forward(model)
                xc = x.contiguous(memory_format=torch.channels_last)

                def fn():
                    with frozen_parameters(model), torch.autocast("cpu", dtype=torch.bfloat16):
                        xx = xc.clone().requires_grad_(True)
                        logits = net(xx)
                        (gr,) = torch.autograd.grad(F.cross_entropy(logits.float(), y, reduction="sum"), xx)
                    return gr
            else:
                fmt = torch.contiguous_format if "nchw" in variant else torch.channels_last
                model.to(memory_format=fmt)
                cf = torch.compile(fused)
                xc = x.contiguous(memory_format=fmt)

                def fn():
                    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                        gr, _ = cf(xc, y)
                    return gr
            s, first, gr = timed(fn, args.repeats, args.warmup)
            results[variant] = (s, first, gr.float().contiguous())
            base_s, _, base_g = results.get("eager fp32", (s, 0, gr))
            diff = ((gr.float() - base_g).abs().max() / base_g.abs().max()).item()
            print(f"| {b} | {variant} | {s:.4f} | {base_s / s:.2f} | {first:.1f} | {diff:.2e} |", flush=True)
    torch._inductor.config.freezing = False
    torch._inductor.config.cpp_wrapper = False


if __name__ == "__main__":
    main()
