"""Achieved GFLOP/s of one training step per method against a matrix-multiply peak measured in the same run.

    .venv/bin/python bench/bench_flops.py [--models small_cnn resnet44] [--batch 128] [--repeats 5] [--threads 1]

The methods are the benchmark's (conf/method/*.yaml, composed as train.py does: standard, pgd,
trades, adv_l2, robust, all). For each, the floating-point operations of one training step
(forward, backward, the adversary's inner steps and the penalty's double backward) are counted
with torch's FlopCounterMode rules (``torch.utils.flop_counter.flop_registry``: matrix multiplies and convolutions, forward and
backward; elementwise work is not counted), the step is timed (median of ``--repeats`` after 2
warm-up steps), and GFLOP/s = FLOPs / seconds. The yardstick is the best of 5 fp32
``torch.mm`` of two N x N matrices (2 N^3 FLOPs each) in the same process and thread count.
Prints a markdown table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from robustx.models import SmallCNN, resnet44
from robustx.training.loss import MethodConfig, training_loss

CONF = Path(__file__).resolve().parents[1] / "conf"
METHODS = ["standard", "pgd", "trades", "adv_l2", "robust", "all"]


def method_config(name: str, overrides: list[str] = ()) -> MethodConfig:
    """The method exactly as ``train.py +experiment=bench_fashion_mnist method=NAME`` composes it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=["+experiment=bench_fashion_mnist", f"method={name}", *overrides])
    return MethodConfig.from_dict(OmegaConf.to_container(cfg.method, resolve=True))


class FlopCount(TorchDispatchMode):
    """Sum of FLOPs of the dispatched ops that torch's FlopCounterMode counts (its flop_registry).

    FlopCounterMode itself also tracks modules with backward hooks, which break the penalty's
    ``torch.autograd.grad`` on the input; this mode counts the same ops without module hooks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:
            self.total += flop_registry[packet](*args, **kwargs, out_val=out)
        return out


def matmul_peak(n: int, repeats: int = 5) -> float:
    """GFLOP/s of the fastest of ``repeats`` fp32 n x n matrix products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def train_step(model_name: str, cfg: MethodConfig, batch: int):
    model = resnet44(activation=cfg.activation) if model_name == "resnet44" else SmallCNN(activation=cfg.activation)
    shape = (3, 32, 32) if model_name == "resnet44" else (1, 28, 28)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    psi = cfg.make_psi()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, *shape, generator=gen), torch.randint(10, (batch,), generator=gen)

    def step():
        out = training_loss(model, x, y, cfg, psi)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["small_cnn"], help="small_cnn and/or resnet44")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--mm-size", type=int, default=2048)
    ap.add_argument("--json", default=str(CONF.parent / "docs" / "robustness_per_compute" / "results_flops.json"), help="numbers as JSON ('' skips)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    peak = matmul_peak(args.mm_size)
    rows = []
    for model_name in args.models:
        base = None
        for name in args.methods:
            step = train_step(model_name, method_config(name), args.batch)
            with FlopCount() as fc:
                step()
            flops = fc.total
            step()
            times = [_timed(step) for _ in range(args.repeats)]
            t = statistics.median(times)
            base = t if name == "standard" else base
            rows.append({"model": model_name, "method": name, "gflop_per_step": flops / 1e9, "seconds": t,
                         "x_standard": t / base if base else None, "gflops": flops / t / 1e9, "share_of_peak": flops / t / 1e9 / peak})
    # The peak again at the end: on a shared machine a peak that moved says the timings moved too.
    peak_end = matmul_peak(args.mm_size)
    print(f"# training step FLOPs and speed: batch {args.batch}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"{platform.machine()}; fp32 mm peak ({args.mm_size}^2) {peak:.1f} GFLOP/s at start, {peak_end:.1f} at end")
    print(f"# command: python bench/bench_flops.py --models {' '.join(args.models)} --batch {args.batch} "
          f"--repeats {args.repeats} --threads {args.threads}")
    print("| model | method | GFLOP/step | s/step | x standard | GFLOP/s | % of mm peak |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        xs = f"{r['x_standard']:.2f}" if r["x_standard"] else ""
        print(f"| {r['model']} | {r['method']} | {r['gflop_per_step']:.2f} | {r['seconds']:.3f} | {xs} | {r['gflops']:.1f} | "
              f"{100 * r['share_of_peak']:.0f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps({"batch": args.batch, "threads": torch.get_num_threads(), "mm_size": args.mm_size,
                                               "peak_gflops": peak, "peak_gflops_end": peak_end, "torch": torch.__version__,
                                               "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
