"""Speed of adversarial explanations (robustx.explain.adversarial) on resnet44, against a plain fp32 loop.

    .venv/bin/python bench/bench_explain.py [--repeats 5] [--threads N] [--ckpt ../shared/reference-checkpoints/resnet44-robust.pt]

Two workloads, both rho = 0.1, T = 35 steps, path 5 * rho (the paper's AE settings):

* ``1 image x 12 targets``: one CIFAR-10 test image toward true, second and all 10 classes;
* ``10 images x true``: ten test images toward their true class.

Yardsticks (fp32 eager, written out in this file, same algorithm: per step forward, CE toward
the target, input gradient, L2 rule - follow -grad while RMSE < rho else pull back along
-delta -, unit-RMSE direction, falling step, final projection onto the rho-ball):

* ``yardstick batched``: all (image, target) pairs in one batch;
* ``yardstick per pair``: the same loop run for one (image, target) pair at a time.

Project paths: ``robustx.explain.adversarial.adversarial_explanations`` with fp32 / bf16 autocast, each
with and without channels_last, and with ``compile=True`` (torch.compile; its first call, which
compiles, is reported in its own column). They run the model only on the pairs that follow the
gradient in a step (the default, ``skip_unused_gradients``: a pair pulled back along -delta needs
no forward); the paths named "every pair every step" run it on all pairs, as the yardstick does,
so their speed-up is the per-step one. The yardstick counts the pairs following the gradient in
each step (printed: the share of pair-steps whose gradient is used). The project explains a pair requested twice (true and
second are also among "all") once, so it runs 10 rows where the yardstick runs 12. Each timing
is the median of ``--repeats`` runs after ``--warmup`` runs; the repeats go round-robin over the
batched yardstick and the paths (``--sequential``: one block each, as before), so that all of them
see the same machine conditions. For each path: seconds, speed-up
over both yardsticks, the RMSE between its AEs and the batched fp32 yardstick's (per pair:
max), max |prob_after difference| and the seconds of the first (warm-up) call.
Writes ``docs/explanation_speed/results_explain.md`` and ``docs/explanation_speed/results_explain.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from robustx.explain.adversarial import adversarial_explanations  # noqa: E402
from robustx.models import resnet44  # noqa: E402


def _rmse(d: torch.Tensor) -> torch.Tensor:
    return d.flatten(1).pow(2).mean(1).sqrt()


def yardstick(model, x, t, *, rho: float, steps: int, overshoot: float, following: list | None = None) -> torch.Tensor:
    """Plain fp32 eager AE loop (the speed reference): (N, C, H, W) images, (N,) targets -> (N, C, H, W) AEs.

    ``following``, if given, receives the number of pairs that follow the gradient in each step.
    """
    delta = torch.zeros_like(x, requires_grad=True)
    total = steps * (steps + 1) / 2
    for s in range(steps):
        loss = F.cross_entropy(model(x + delta), t, reduction="sum")
        (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            inside = (_rmse(delta) < rho).view(-1, 1, 1, 1)
            if following is not None:
                following.append(int(inside.sum()))
            d = torch.where(inside, -g, -delta)
            d = d / (1e-8 + _rmse(d).view(-1, 1, 1, 1))
            delta += rho * overshoot * (steps - s) / total * d
    with torch.no_grad():
        delta *= (rho / _rmse(delta).clamp(min=1e-12)).clamp(max=1.0).view(-1, 1, 1, 1)
    return (x + delta).detach()


def yardstick_targets(model, x, y, spec: str) -> torch.Tensor:
    """(B, K) targets computed independently of robustx: 'true' or 'true,second,all'."""
    if spec == "true":
        return y[:, None]
    with torch.no_grad():
        logits = model(x)
    second = logits.scatter(1, y[:, None], float("-inf")).argmax(1)
    return torch.cat([y[:, None], second[:, None], torch.arange(logits.size(1)).expand(x.size(0), -1)], 1)


def load(args):
    ckpt = Path(args.ckpt) if args.ckpt else None
    if ckpt is not None and ckpt.is_file():
        from robustx.io.legacy import import_reference_checkpoint

        model, _ = import_reference_checkpoint(ckpt)
        name = ckpt.name
    else:
        torch.manual_seed(0)
        model, name = resnet44(activation="hhrelu"), "resnet44 random init (hhrelu)"
    n = 10
    tar = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"
    data = "random images"
    if tar.is_dir():
        try:
            from datamodules import CIFAR10DataModule

            dm = CIFAR10DataModule(root=str(tar), limit_test=n)
            dm.prepare_data()
            dm.setup("test")
            x = torch.stack([dm.test_set[i][0] for i in range(n)])
            y = torch.tensor([int(dm.test_set[i][1]) for i in range(n)])
            data = "CIFAR-10 test images 0..9"
        except Exception as err:  # noqa: BLE001 - fall back to random images, say so in the output
            print(f"# could not read CIFAR-10 ({type(err).__name__}: {err}); using random images", file=sys.stderr)
            x = None
    if data == "random images":
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(n, 3, 32, 32, generator=g), torch.randint(10, (n,), generator=g)
    return model.eval(), name, x.contiguous(), y, data


YARD = "yardstick batched (fp32 loop)"


def timed(fns: dict, warmup: int, repeats: int, *, interleave: bool = True) -> dict:
    """name -> (median seconds, all timed seconds, last output, seconds of the first warm-up call or None).

    Each function's warm-up calls run first; then the timed repeats go round-robin over the
    functions (``interleave``), which puts the yardstick and every path under the same machine
    conditions: this VM's speed drifts by 10-30% within minutes, which sequential blocks of
    repeats (``interleave=False``) turn into a bias for or against whichever ran in a slow phase.
    """
    if not interleave:
        return {name: timed({name: fn}, warmup, repeats)[name] for name, fn in fns.items()}
    first, out = {}, {}
    for name, fn in fns.items():
        for i in range(warmup):
            t0 = time.perf_counter()
            out[name] = fn()
            if i == 0:
                first[name] = time.perf_counter() - t0
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), times[name], out[name], first.get(name)) for name in fns}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=35)
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--overshoot", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, i.e. all cores)")
    ap.add_argument("--ckpt", default=str(ROOT.parent / "shared" / "reference-checkpoints" / "resnet44-robust.pt"))
    ap.add_argument("--paths", nargs="+", default=None, help="project paths to time (default: all)")
    ap.add_argument("--no-per-pair", action="store_true", help="skip the one-pair-at-a-time yardstick")
    ap.add_argument("--sequential", action="store_true",
                    help="time each path's repeats in one block (runs before 2026-11-26's later stop) instead of round-robin")
    ap.add_argument("--out", default=str(ROOT / "docs" / "explanation_speed" / "results_explain"), help="writes OUT.md and OUT.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "OMP_NUM_THREADS=%s .venv/bin/python bench/bench_explain.py %s" % (
        os.environ.get("OMP_NUM_THREADS", "<unset>"), shlex.join(sys.argv[1:])
    )
    load_start = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    model, model_name, x_all, y_all, data = load(args)
    kw = dict(rho=args.rho, steps=args.steps, overshoot=args.overshoot)
    # (name, autocast dtype, channels_last, compile, skip_unused_gradients)
    paths = [
        ("robustx fp32", None, False, False, True),
        ("robustx fp32, every pair every step", None, False, False, False),
        ("robustx fp32 + channels_last", None, True, False, True),
        ("robustx bf16", torch.bfloat16, False, False, True),
        ("robustx bf16 + channels_last", torch.bfloat16, True, False, True),
        ("robustx fp32 + compile", None, False, True, True),
        ("robustx bf16 + channels_last + compile", torch.bfloat16, True, True, True),
        ("robustx bf16 + channels_last + compile, every pair every step", torch.bfloat16, True, True, False),
    ]
    if args.paths:
        unknown = set(args.paths) - {p[0] for p in paths}
        if unknown:
            raise SystemExit(f"unknown --paths {sorted(unknown)}; choose from {[p[0] for p in paths]}")
        paths = [p for p in paths if p[0] in args.paths]
    workloads = [
        ("1 image x 12 targets", x_all[:1], y_all[:1], ["true", "second", "all"], "true,second,all"),
        ("10 images x true", x_all, y_all, "true", "true"),
    ]
    header = (
        f"# Adversarial explanations, {model_name}, {data}, rho {args.rho}, {args.steps} steps, path {args.overshoot} x rho; "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}; "
        f"median of {args.repeats} after {args.warmup} warm-up"
        f"{'' if args.sequential else ', repeats round-robin over the yardstick and the paths'}"
    )
    rows, records, uses = [], [], []
    print(header, flush=True)
    cols = "| workload | path | s | x yardstick batched | x yardstick per pair | max RMSE(AE - fp32 AE) | max abs prob_after diff | first call s |"
    print(cols + "\n|---|---|---|---|---|---|---|---|", flush=True)
    for wname, x, y, spec, yspec in workloads:
        t = yardstick_targets(model, x, y, yspec)  # (B, K)
        b, k = t.shape
        x_rep = x.repeat_interleave(k, 0)  # (B*K, C, H, W)
        t_rep = t.reshape(-1)  # (B*K,)
        fns = {YARD: lambda: yardstick(model, x_rep, t_rep, **kw)}
        for name, dtype, cl, comp, skip in paths:
            fns[name] = lambda dtype=dtype, cl=cl, comp=comp, skip=skip: adversarial_explanations(
                model, x, y, targets=spec, autocast_dtype=dtype, channels_last=cl, compile=comp, skip_unused_gradients=skip, **kw
            )
        timings = timed(fns, args.warmup, args.repeats, interleave=not args.sequential)
        base, base_times, ref, base_first = timings[YARD]
        with torch.no_grad():
            p_ref = model(ref).softmax(1).gather(1, t_rep[:, None])[:, 0]  # (B*K,)
        following: list[int] = []
        yardstick(model, x_rep, t_rep, following=following, **kw)
        share = sum(following) / (len(following) * x_rep.size(0))
        used = f"{wname}: the gradient is used in {sum(following)} of {len(following) * x_rep.size(0)} pair-steps ({100 * share:.0f}%)"
        uses.append(used)
        print("# " + used, flush=True)
        per_pair = None
        if not args.no_per_pair:
            per_pair, pp_times, pp, pp_first = timed(
                {"per pair": lambda: torch.cat([yardstick(model, x_rep[i : i + 1], t_rep[i : i + 1], **kw) for i in range(b * k)])},
                min(args.warmup, 1), max(1, min(args.repeats, 3)),
            )["per pair"]
        entries = [(YARD, base, base_times, ref, p_ref, base_first)]
        if per_pair is not None:
            with torch.no_grad():
                p_pp = model(pp).softmax(1).gather(1, t_rep[:, None])[:, 0]
            entries.append(("yardstick per pair (fp32 loop)", per_pair, pp_times, pp, p_pp, pp_first))
        for name, *_ in paths:
            sec, times, res, first = timings[name]
            assert torch.equal(res.targets, t), "robustx and the yardstick disagree on the targets"
            entries.append((name, sec, times, res.images.flatten(0, 1), res.prob_after.flatten(), first))
        for name, sec, times, ae, p, first in entries:
            err = float(_rmse(ae - ref).max())
            dp = float((p - p_ref).abs().max())
            rec = {
                "workload": wname, "path": name, "seconds": sec, "times": times, "pairs": b * k,
                "speedup_vs_batched": base / sec, "speedup_vs_per_pair": (per_pair / sec) if per_pair else None,
                "max_rmse_vs_fp32": err, "max_abs_prob_after_diff": dp, "first_call_seconds": first,
                "gradient_used_share": share,
            }
            records.append(rec)
            sp = f"{per_pair / sec:.2f}" if per_pair else "-"
            fc = f"{first:.1f}" if first is not None else "-"
            row = f"| {wname} | {name} | {sec:.3f} | {base / sec:.2f} | {sp} | {err:.2e} | {dp:.2e} | {fc} |"
            rows.append(row)
            print(row, flush=True)

    # Recommended: the fastest project path (summed over workloads) whose AEs stay within 10% of
    # rho of the fp32 ones and whose probabilities differ by < 0.05.
    totals: dict[str, float] = {}
    ok: dict[str, bool] = {}
    for r in records:
        if r["path"].startswith("robustx"):
            totals[r["path"]] = totals.get(r["path"], 0.0) + r["seconds"]
            good = r["max_rmse_vs_fp32"] < 0.1 * args.rho and r["max_abs_prob_after_diff"] < 0.05
            ok[r["path"]] = ok.get(r["path"], True) and good
    candidates = [p for p in totals if ok[p]] or list(totals)
    best = min(candidates, key=totals.get)
    load_end = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    summary = f"Recommended setting: **{best}** (fastest path with max RMSE to fp32 < 0.1 rho and max |dp| < 0.05)."
    print("\n" + summary)
    print(f"load average at start {' '.join(load_start)}, at end {' '.join(load_end)}")
    md = [
        header, "", f"Command: `{command}`", "",
        f"Load average (1/5/15 min) at start: {' '.join(load_start)}; at end: {' '.join(load_end)}.", "",
        cols, "|---|---|---|---|---|---|---|---|", *rows, "", *[f"- {u}" for u in uses], "", summary, "",
    ]
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(md))
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "command": command, "header": header, "threads": torch.get_num_threads(), "torch": torch.__version__,
                "model": model_name, "data": data, "rho": args.rho, "steps": args.steps, "overshoot": args.overshoot,
                "loadavg_start": load_start, "loadavg_end": load_end, "recommended": best, "results": records,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
