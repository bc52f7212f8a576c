"""Exploration (not a framework path): can torch.compile speed up the paper's exact penalty step?

    .venv/bin/python bench/explore_penalty_compile.py [--batch 128] [--repeats 5]

torch.compile cannot differentiate a compiled graph twice, so the eager double backprop of
robustx.training.penalty cannot be compiled as it is. This script writes the input gradient with
``torch.func.grad`` instead, which dynamo traces into the forward graph; AOTAutograd then
derives the (double) backward of that graph and inductor fuses BatchNorm's and the half-Huber
ReLU's element-wise work. BatchNorm uses batch statistics but does not update its running
statistics inside the transform (a real training path would have to update them separately).

Times one resnet44 (HHReLU) training step of the robust loss CE + psi * mean(ds/dx)^2 for:
the plain fp32 eager step (the yardstick), the project's eager double-backprop step in bf16
autocast, and the torch.func + torch.compile step in bf16 autocast, NCHW and channels_last; and
the cosine between the compiled and the eager parameter gradients on the same batch and
selection. Compilation time is reported apart from the step times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from robustx.models import resnet44
from robustx.training.penalty import _apply_selection, _selection

PSI = 220.0


def eager_loss(model, x, y, sel):
    """The project's exact penalty (double backprop), same selection."""
    xx = x.detach().requires_grad_(True)
    logits = model(xx)
    (g,) = torch.autograd.grad(_apply_selection(logits, y, sel).sum(), xx, create_graph=True)
    return F.cross_entropy(logits.float(), y) + PSI * g.float().pow(2).mean()


def func_loss(model, x, y, pick, tandem, runner):
    """The same loss with the input gradient from torch.func.grad (traceable by torch.compile)."""

    def s_fn(xx):
        logits = model(xx)
        return _apply_selection(logits, y, (pick, tandem, runner)).sum(), logits

    g, logits = torch.func.grad(s_fn, has_aux=True)(x)
    return F.cross_entropy(logits.float(), y) + PSI * g.float().pow(2).mean()


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def timed(step, repeats):
    for _ in range(2):
        step()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    x = torch.rand(a.batch, 3, 32, 32)
    y = torch.randint(10, (a.batch,))
    sel = _selection(torch.randn(a.batch, 10), y, zeta=0.2, generator=None)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731

    plain = resnet44(activation="relu").train()
    t_plain = timed(lambda: grads(plain, F.cross_entropy(plain(x), y)), a.repeats)

    rows = [("plain, fp32 eager (yardstick)", t_plain, None, None)]
    model = resnet44(activation="hhrelu").train()

    def eager_step():
        with bf16():
            loss = eager_loss(model, x, y, sel)
        return grads(model, loss)

    rows.append(("robust, exact penalty, eager bf16-mixed (project)", timed(eager_step, a.repeats), None, None))
    with bf16():
        ref = grads(model, eager_loss(model, x, y, sel))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for cl in (False, True):
        torch._dynamo.reset()
        m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        xi = x.contiguous(memory_format=torch.channels_last) if cl else x
        step_fn = torch.compile(func_loss)
        for bn in bns:
            bn.track_running_stats = False
        try:
            t0 = time.perf_counter()
            with bf16():
                g = grads(m, step_fn(m, xi, y, *sel))
            t_compile = time.perf_counter() - t0

            def step():
                with bf16():
                    return grads(m, step_fn(m, xi, y, *sel))

            t = timed(step, a.repeats)
        finally:
            for bn in bns:
                bn.track_running_stats = True
        cos = float(F.cosine_similarity(g.float(), ref.float(), dim=0))
        rows.append((f"robust, exact penalty, torch.func + compile bf16-mixed{' + channels_last' if cl else ''}", t, t_compile, cos))

    print(f"# resnet44, batch {a.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}; median of {a.repeats} steps after 2 warm-ups")
    print("| step | s | x plain fp32 | compile s | grad cosine vs eager bf16 |")
    print("|---|---|---|---|---|")
    for name, t, tc, cos in rows:
        print(f"| {name} | {t:.3f} | {t / t_plain:.2f} | {'-' if tc is None else f'{tc:.0f}'} | {'-' if cos is None else f'{cos:.4f}'} |")


if __name__ == "__main__":
    main()
