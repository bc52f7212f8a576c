"""Time one training step per method, as a ratio to a plain fp32 eager step measured in the same run.

    .venv/bin/python bench/bench_train_step.py [--models resnet44 small_cnn] [--batch 128] [--repeats 5]
    python bench/bench_train_step.py --device cuda     # on a GPU (TF32 off: plain fp32 is the yardstick)

Methods: plain (standard CE, fp32, eager: the yardstick), robust (penalty + HHReLU + adaptive
psi), all (robust + L2,min adversarial training + half-and-half), and all with
adversarial.attack_subset=true (attack only the half that gets perturbed), each in fp32, in
bf16-mixed autocast (trainer.precision=bf16-mixed) and in bf16-mixed with channels_last
(channels_last=true). "(fused)" rows set method.penalty_impl=double_backprop_fused (the same
gradient through robustx.training.double_backprop's kernels; the first steps compile, which the two
warm-up steps absorb); "compiled attack" rows set method.adversarial.compile=true. Prints a markdown table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext

import torch

from robustx.models import SmallCNN, resnet44
from robustx.training.loss import MethodConfig, training_loss

def _paper(penalty_impl: str = "double_backprop", attack: dict | None = None) -> dict:
    """The paper's robust method (penalty + HHReLU + adaptive psi); with ``attack`` (options added to
    L2,min adversarial training, eps 0.1, 7 steps, half-and-half) its ``all`` method."""
    method = {"name": "robust", "activation": "hhrelu", "penalty": True, "penalty_impl": penalty_impl}
    if attack is not None:
        method.update(name="all", adversarial={"kind": "l2min", "eps": 0.1, "steps": 7, "half_and_half": True, **attack})
    return method


FUSED, SUBSET, COMPILED = "double_backprop_fused", {"attack_subset": True}, {"compile": True}
METHODS = {
    "plain": {"name": "standard"},
    "robust": _paper(),
    "all": _paper(attack={}),
    "all (attack_subset)": _paper(attack=SUBSET),
    "robust (fused)": _paper(FUSED),
    "all (fused + attack_subset)": _paper(FUSED, SUBSET),
    "all (fused)": _paper(FUSED, {}),
    "all (fused + compiled attack)": _paper(FUSED, COMPILED),
    "all (fused + compiled attack + attack_subset)": _paper(FUSED, {**SUBSET, **COMPILED}),
    "robust (finite_difference)": _paper("finite_difference"),
    "all (finite_difference + attack_subset)": _paper("finite_difference", SUBSET),
}
PATHS = {"fp32 eager": (False, False), "bf16-mixed": (True, False), "bf16-mixed + channels_last": (True, True)}


def make(model_name: str, activation: str, channels_last: bool):  # noqa: D103
    if model_name == "resnet44":
        m, shape = resnet44(activation=activation), (3, 32, 32)
    else:
        m, shape = SmallCNN(activation=activation), (1, 28, 28)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    return m, shape


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(model_name: str, method: dict, *, batch: int, repeats: int, bf16: bool, cl: bool,
              device: torch.device = torch.device("cpu")) -> float:
    cfg = MethodConfig.from_dict(method)
    model, shape = make(model_name, cfg.activation, cl)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    psi = cfg.make_psi()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *shape, generator=gen).to(device)
    y = torch.randint(10, (batch,), generator=gen).to(device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    times = []
    for i in range(repeats + 2):
        _sync(device)
        t0 = time.perf_counter()
        with ctx:
            out = training_loss(model, x, y, cfg, psi)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        _sync(device)
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet44", "small_cnn"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", default="docs/train_step_speed/results_train_step.json", help="numbers as JSON ('' skips; run from the repository root)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help="subset of: %(default)s")
    ap.add_argument("--paths", nargs="+", default=list(PATHS), help="subset of: %(default)s")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but CUDA is not available here; use --device cpu.")
        # The yardstick is true fp32; TF32 would make "plain fp32" a reduced-precision path.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    rows = []
    for model_name in args.models:
        base = time_step(model_name, METHODS["plain"], batch=args.batch, repeats=args.repeats, bf16=False, cl=False,
                         device=device)
        for path, (bf16, cl) in PATHS.items():
            if path not in args.paths:
                continue
            for name, method in METHODS.items():
                if name not in args.methods and name != "plain":
                    continue
                t = base if (name == "plain" and not bf16 and not cl) else time_step(
                    model_name, method, batch=args.batch, repeats=args.repeats, bf16=bf16, cl=cl, device=device
                )
                rows.append(
                    {
                        "model": model_name,
                        "method": name,
                        "path": path,
                        "seconds": t,
                        "ratio_to_plain_fp32": t / base,
                    }
                )
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# train step, batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}, {where}")
    print("| model | method | path | s/step | x plain fp32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['path']} | {r['seconds']:.3f} | {r['ratio_to_plain_fp32']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "threads": torch.get_num_threads(), "device": where, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
