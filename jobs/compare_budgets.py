#!/usr/bin/env python
"""Compare benchmark summaries made at different budgets: does the ranking of the methods hold?

    python scripts/compare_budgets.py 3=docs/robustness_per_compute/bench_fashion_mnist 8=docs/robustness_per_compute/bench_fashion_mnist_8min \
        20=docs/robustness_per_compute/bench_fashion_mnist_20min --out docs/robustness_per_compute/bench_fashion_mnist_budgets

Each argument is LABEL=PATH, PATH a ``scripts/summarize_runs.py`` output folder (its rows.json) or a
rows.json file, LABEL the budget's name (minutes, say), in increasing budget order. Runs are matched
across budgets by method family and sweep settings (the method config, not the printed label);
runs of the same settings within a budget (seeds) are compared on their means.
Writes ``DIR/budgets.md``: per run, test accuracy, BTR ARA and ensemble Attack ARA at each budget;
Kendall's tau between consecutive budgets of the runs' order by each quantity (1 = same order,
computed over the runs present at both); the equal-compute target check of summarize_runs.py at each
budget. And ``DIR/budgets.png``: each run's path in accuracy-vs-ARA space as the budget grows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from jobs import summarize_runs as sr
from robustx.io.files import atomic_write

log = logging.getLogger("compare_budgets")

#: The quantities compared across budgets: (row key, column name); ARAs are [value, lo, hi].
QUANTITIES = [("test_acc", "test acc"), ("btr", "BTR ARA"), ("ensemble", "ensemble ARA")]


def run_key(row: dict[str, Any]) -> str:
    """Identity of a run across budgets: its family and the settings that name a sweep point."""
    return sr.settings_key(row)


def value(row: dict[str, Any] | None, key: str) -> float | None:
    if row is None or row.get(key) is None:
        return None
    v = row[key]
    return float(v[0] if isinstance(v, (list, tuple)) else v)


def seed_merged(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{run key: row}, runs with the same settings (seeds) merged into one row of their means.

    The rows are summarize_runs.py's seed means (accuracy the mean over the runs, each ARA
    (mean, smallest, largest); a quantity some of the runs lack is None); a merged row also
    counts its runs in ``seeds_merged``.
    """
    out = {}
    for m in sr.seed_means(rows):
        if len(m["seeds"]) > 1:
            m["seeds_merged"] = len(m["seeds"])
        out[run_key(m)] = m
    return out


def load_budgets(specs: list[str]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Parse LABEL=PATH arguments into (label, rows); raises ValueError naming the bad argument."""
    out = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"argument {spec!r} is not LABEL=PATH (e.g. 8=docs/robustness_per_compute/bench_fashion_mnist_8min)")
        p = Path(path)
        f = p / "rows.json" if p.is_dir() else p
        if not f.is_file():
            raise ValueError(f"{spec}: no rows.json at {f} (make it with scripts/summarize_runs.py --out {p})")
        try:
            rows = json.loads(f.read_text())["rows"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{spec}: {f} is not a summarize_runs.py rows.json ({type(err).__name__}: {err})") from err
        bad = [i for i, r in enumerate(rows) if not isinstance(r, dict) or not {"family", "method", "test_acc"} <= r.keys()]
        if bad:
            raise ValueError(f"{spec}: rows {bad[:5]} of {f} lack family/method/test_acc (re-make it with scripts/summarize_runs.py)")
        out.append((label, rows))
    if len(out) < 2:
        raise ValueError("give at least two budgets (LABEL=PATH LABEL=PATH ...)")
    return out


def rank_agreement(a: dict[str, dict], b: dict[str, dict], key: str) -> tuple[float | None, int]:
    """Kendall's tau between the orders of the runs common to ``a`` and ``b`` by ``key``, and their count."""
    from scipy.stats import kendalltau

    common = [k for k in a if k in b and value(a[k], key) is not None and value(b[k], key) is not None]
    if len(common) < 3:
        return None, len(common)
    tau = kendalltau([value(a[k], key) for k in common], [value(b[k], key) for k in common]).statistic
    return float(tau), len(common)


def compare(budgets: list[tuple[str, list[dict[str, Any]]]], *, compare_families: list[str], against: str,
            ratio: float, max_drop: float) -> tuple[str, list[str], dict[str, dict[str, dict]], dict[str, str]]:
    """Markdown report, the run keys in table order, {budget: {key: row}} and {key: label}."""
    by_budget: dict[str, dict[str, dict]] = {}
    for lab, rows in budgets:
        by_budget[lab] = seed_merged(rows)
        for k, r in by_budget[lab].items():
            if r.get("seeds_merged", 1) > 1:
                log.info("budget %s: %d runs with the same settings (%s): compared on their means",
                         lab, r["seeds_merged"], r.get("label"))
    # One label per run, from the union of all budgets, so that a run is named the same everywhere.
    reps: dict[str, dict] = {}
    for _, rows in budgets:
        for r in rows:
            reps.setdefault(run_key(r), {"family": r["family"], "method": r["method"]})
    sr.label_rows(list(reps.values()))
    labels = {k: v["label"] for k, v in reps.items()}
    order = list(sr.COLORS)
    keys = sorted(reps, key=lambda k: (order.index(reps[k]["family"]) if reps[k]["family"] in order else 99, labels[k]))
    names = [lab for lab, _ in budgets]

    lines = ["## Per run, at each budget", ""]
    head = ["run"] + [f"{col} @{b}" for _, col in QUANTITIES for b in names]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        cells = [labels[k]]
        for q, _ in QUANTITIES:
            cells += [sr._fmt(value(by_budget[b].get(k), q)) for b in names]
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "## Does the order hold? Kendall's tau between consecutive budgets", "",
              "| budgets | " + " | ".join(col for _, col in QUANTITIES) + " |", "|---|" + "---|" * len(QUANTITIES)]
    for b0, b1 in zip(names, names[1:]):
        cells = []
        for q, _ in QUANTITIES:
            tau, n = rank_agreement(by_budget[b0], by_budget[b1], q)
            cells.append("n/a" if tau is None else f"{tau:.2f} ({n} runs)")
        lines.append(f"| {b0} -> {b1} | " + " | ".join(cells) + " |")
    lines += ["", "Order by BTR ARA, highest first:", ""]
    for b in names:
        ranked = sorted((k for k in by_budget[b] if value(by_budget[b][k], "btr") is not None),
                        key=lambda k: -value(by_budget[b][k], "btr"))
        lines.append(f"- {b}: " + " > ".join(labels[k] for k in ranked))

    lines += ["", f"## Target check at each budget (best {'/'.join(compare_families)} within {100 * max_drop:.0f} points "
              f"of each {against} run; target >= {ratio}x its BTR ARA)", ""]
    for b in names:
        rows = [dict(r, label=labels[k]) for k, r in by_budget[b].items()]
        lines.append(f"**{b}**")
        lines += sr.target_check(rows, compare_families, against, ratio, max_drop) or ["- (no runs to compare)"]
        lines.append("")
    return "\n".join(lines) + "\n", keys, by_budget, labels


def plot(keys: list[str], by_budget: dict[str, dict[str, dict]], labels: dict[str, str], png: Path, title: str,
         *, min_acc: float = 0.0) -> None:
    """Each run's (accuracy, ARA) point at each budget, joined by arrows in budget order.

    Points below ``min_acc`` clean accuracy (a collapsed run) are left out so that they do not
    squash the axes; the title names them (the table still has them).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(by_budget)
    panels = [("btr", "BTR ARA (paper's attack engine)"), ("ensemble", "Attack ARA (ensemble)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 5.2), squeeze=False)
    dropped = sorted({f"{labels[k]} @{b}" for k in keys for b in names
                      if (a := value(by_budget[b].get(k), "test_acc")) is not None and a < min_acc})
    for ax, (q, yname) in zip(axes[0], panels):
        for k in keys:
            pts = [(b, value(by_budget[b].get(k), "test_acc"), value(by_budget[b].get(k), q)) for b in names]
            pts = [p for p in pts if p[1] is not None and p[2] is not None and p[1] >= min_acc]
            if not pts:
                continue
            fam = json.loads(k)[0]
            c = sr.COLORS.get(fam, "k")
            ax.plot([p[1] for p in pts], [p[2] for p in pts], "o", color=c, ms=3, alpha=0.5)
            for (_, x0, y0), (_, x1, y1) in zip(pts, pts[1:]):
                ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": c, "lw": 0.9, "alpha": 0.8})
            b, x, y = pts[-1]
            ax.plot([x], [y], "o", color=c, ms=6)
            ax.annotate(f"{labels[k]} @{b}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("clean test accuracy")
        ax.set_ylabel(yname)
        ax.grid(alpha=0.3)
    note = f"; not shown, accuracy < {min_acc}: " + ", ".join(dropped) if dropped else ""
    fig.suptitle(title + " (arrows: " + " -> ".join(names) + note + ")", fontsize=10)
    sr.save_figure(fig, png)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("budgets", nargs="+", help="LABEL=PATH (summarize_runs.py output folder or rows.json), smallest budget first")
    p.add_argument("--out", type=Path, required=True, help="folder for budgets.md and budgets.png")
    p.add_argument("--compare", default="robust,all", help="families checked against --against (comma-separated)")
    p.add_argument("--against", default="pgd")
    p.add_argument("--ratio", type=float, default=1.5, help="target BTR ARA ratio")
    p.add_argument("--max-drop", type=float, default=0.03, help="allowed clean-accuracy drop (fraction)")
    p.add_argument("--title", default="Each run as the budget grows")
    p.add_argument("--plot-min-acc", type=float, default=0.5,
                   help="leave points below this clean accuracy (collapsed runs) out of the plot; 0 shows all")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        budgets = load_budgets(args.budgets)
    except ValueError as err:
        log.error("compare_budgets: %s", err)
        return 2
    md, keys, by_budget, labels = compare(budgets, compare_families=args.compare.split(","), against=args.against,
                                          ratio=args.ratio, max_drop=args.max_drop)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "budgets.md", md)
    plot(keys, by_budget, labels, args.out / "budgets.png", args.title, min_acc=args.plot_min_acc)
    print(md)
    log.info("wrote %s, %s", args.out / "budgets.md", args.out / "budgets.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
