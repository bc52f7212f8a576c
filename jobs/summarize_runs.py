"""Collect the bench.json files of one or more (multi)runs into a markdown table and trade-off plots.

    python scripts/summarize_runs.py logs/train/multiruns/bench_fashion_mnist/<date> [MORE_DIRS...] --out DIR
        [--reference docs/reference_networks/reference_ara_paper_200 ...]   # eval.py JSONs (e.g. the CIFAR-10 reference networks)
        [--wandb ENTITY/PROJECT [--wandb-group GROUP]]      # also pull runs' bench/* summaries from W&B (online only)
        [--compare robust,all --against pgd]                # the equal-compute target check
        [--btr-from DIR] [--attack-from DIR]                # ARAs from re-evaluations (scripts/recheck_paper_protocol.sh)

Each run of ``+experiment=bench_*`` writes ``bench.json`` (jobs/bench.py); any run
folder below the given directories is found. Writes ``DIR/summary.md`` (tables), ``DIR/rows.json``
(the rows, without per-image r_i) and ``DIR/tradeoff.png`` (clean accuracy against BTR ARA and
against the ensemble Attack ARA, 95% CIs, one colour per method family, lines through each
family's sweep and the Pareto frontier of all runs). Runs with the same settings and different
seeds are labelled ``seed=N``; the summary then adds a table of seed means and the target check
on those means.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("summarize_runs")

#: Method settings that name a point of a sweep (flattened keys of the method dict).
SWEEP_KEYS = ["l_target", "psi0", "adaptive", "z", "zeta", "adversarial.eps", "adversarial.steps", "adversarial.beta",
              "adversarial.half_and_half", "adversarial.attack_subset", "penalty_impl"]
SHORT = {"adversarial.eps": "eps", "adversarial.steps": "steps", "adversarial.beta": "beta",
         "adversarial.half_and_half": "h&h", "adversarial.attack_subset": "subset"}
COLORS = {"standard": "tab:gray", "pgd": "tab:blue", "trades": "tab:cyan", "adv_l2": "tab:purple", "adv_l2min": "tab:pink",
          "robust": "tab:orange", "all": "tab:red"}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def find_bench_files(dirs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for d in dirs:
        if d.is_file() and d.name == "bench.json":
            files.append(d)
        elif d.is_dir():
            files.extend(sorted(d.rglob("bench.json")))
        else:
            log.warning("skipping %s: not a folder or bench.json", d)
    seen, unique = set(), []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def _ara(block: dict | None) -> tuple[float, float, float] | None:
    if not block:
        return None
    return float(block["ara"]), float(block.get("ara_ci_low", math.nan)), float(block.get("ara_ci_high", math.nan))


def row_from_bench(path: Path, b: dict) -> dict[str, Any]:
    e, t = b["eval"], b.get("timing") or {}
    return {
        "source": str(path.parent),
        "family": b.get("method_name") or (b.get("method") or {}).get("name", "?"),
        "method": _flat(b.get("method") or {}),
        "overrides": b.get("overrides", ""),
        "seed": b.get("seed"),
        "test_acc": b.get("test_acc"),
        "eval_acc": e.get("accuracy"),
        "num_images": e.get("num_images"),
        "ids_seed": e.get("ids_seed"),
        "attack": _ara(e.get("attack")),
        "btr": _ara(e.get("btr")),
        "ensemble": _ara(e.get("ensemble")),
        "robust_acc": {k: v.get("ensemble", v.get("paper")) for k, v in (e.get("robust_acc") or {}).items()},
        "train_seconds": t.get("train_seconds"),
        "steps": t.get("steps"),
        "seconds_per_step": t.get("seconds_per_step"),
        "epochs": t.get("epochs"),
        "budget_minutes": b.get("budget_minutes"),
        "protocol": (e.get("settings") or {}).get("protocol"),
        "warnings": e.get("warnings", []),
    }


def same_images(recheck: dict[str, Any], *, ids_seed: Any, num_images: Any, accuracy: Any) -> bool:
    """Whether an eval.py result (``recheck``) saw a benchmark's test images: the same draw (seed
    and count), checked once more through the clean accuracy."""
    return ((recheck.get("data") or {}).get("val_seed"), recheck.get("num_images"), recheck.get("accuracy")) == (
        ids_seed, num_images, accuracy)


#: Per kind of re-evaluation (scripts/recheck_paper_protocol.sh MODE=btr / MODE=attack): the row's
#: columns taken from eval.py's JSON blocks, the block the re-evaluation must have, the prefixes of
#: the warnings it replaces, its name in log lines and the command that makes it.
RECHECK_KINDS = {
    "btr": {"columns": ("btr",), "required": "btr", "warnings": ("btr:",), "name": "BTR", "a": "a BTR",
            "make": "scripts/recheck_paper_protocol.sh"},
    "attack": {"columns": ("attack", "ensemble"), "required": "ensemble", "warnings": ("attack:", "GRADIENT MASKING"),
               "name": "Attack + ensemble", "a": "an Attack", "make": "scripts/recheck_paper_protocol.sh MODE=attack"},
}


def apply_rechecks(rows: list[dict[str, Any]], dirs: list[Path], *, kind: str = "btr") -> list[dict[str, Any]]:
    """Rows re-evaluated by eval.py (scripts/recheck_paper_protocol.sh), with the re-evaluation's ARAs.

    ``kind="btr"`` takes the BTR ARA; ``kind="attack"`` the Attack ARA and the ensemble with the
    independent attack (MODE=attack), and recomputes the robust accuracies from that ensemble's r_i. Each ``model.json`` under ``dirs`` names its checkpoint,
    whose folder is a row's ``source``. The re-evaluation must have seen the benchmark's images
    (same draw: seed, count, and the same clean accuracy), else it is refused with a log line.
    Rows without a re-evaluation are left out (logged), so that a table never mixes protocols;
    columns not replaced keep the benchmark's protocol, which ``protocol`` then names
    (``fast, btr <- paper``); the evaluation's warnings about the replaced criterion are replaced
    by the re-evaluation's.
    """
    spec = RECHECK_KINDS[kind]
    columns = spec["columns"]
    rechecks: dict[str, dict] = {}
    for d in dirs:
        for f in sorted(Path(d).rglob("model.json")):
            try:
                j = json.loads(f.read_text())
                rechecks[str(Path(j["checkpoint"]).parent.resolve())] = j
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                log.warning("skipping %s (%s: %s)", f, type(err).__name__, err)
    out = []
    for r in rows:
        j = rechecks.get(str(Path(r["source"]).resolve()))
        if j is None or not j.get(spec["required"]):
            log.info("leaving out %s: no %s re-evaluation for it under %s", r["source"], spec["name"], ", ".join(map(str, dirs)))
            continue
        if r.get("ids_seed") is None:
            log.info("leaving out %s: no image draw recorded to check the re-evaluation's images against", r["source"])
            continue
        if not same_images(j, ids_seed=r["ids_seed"], num_images=r["num_images"], accuracy=r["eval_acc"]):
            log.warning("leaving out %s: its re-evaluation saw other images (seed/count/accuracy differ)", r["source"])
            continue
        prot = (j.get("settings") or {}).get("protocol")
        new = {c: _ara(j[c]) for c in columns}
        if kind == "attack":
            steps = {n: c.get("steps") for n, c in (j.get("cross_check") or {}).items()}
            prot += "".join(f" + {n}" + (f" {k}" if k else "") for n, k in steps.items())
            r_ens = j["ensemble"].get("r") or []
            if r_ens:  # robust accuracy at each eps = share of images whose ensemble r exceeds it
                new["robust_acc"] = {e: sum(x > float(e) for x in r_ens) / len(r_ens) for e in r["robust_acc"]}
        # The evaluation's warnings about the replaced criterion are the re-evaluation's now.
        mine = spec["warnings"]
        new["warnings"] = [w for w in r.get("warnings", []) if not w.startswith(mine)] + [
            w for w in j.get("warnings", []) if w.startswith(mine)]
        out.append(dict(r, **new, protocol=f"{r['protocol']}, {'+'.join(columns)} <- {prot}"))
    return out


def rows_from_wandb(path: str, group: str | None) -> list[dict[str, Any]]:
    """Rows from W&B runs' ``bench/*`` summaries; [] (with a log line) when offline or unavailable."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        log.info("W&B: WANDB_MODE=%s, not pulling runs from %s", os.environ["WANDB_MODE"], path)
        return []
    try:
        import wandb

        api = wandb.Api(timeout=15)
        runs = api.runs(path, filters={"group": group} if group else None)
        rows = []
        for r in runs:
            s = dict(r.summary)
            if "bench/btr_ara" not in s:
                continue
            method = _flat((r.config.get("config") or {}).get("method", {}))
            get3 = lambda k: (s[f"bench/{k}_ara"], s.get(f"bench/{k}_ara_ci_low", math.nan), s.get(f"bench/{k}_ara_ci_high", math.nan))  # noqa: E731
            rows.append({
                "source": f"wandb:{path}/{r.id}", "family": method.get("name", "?"), "method": method, "overrides": r.name,
                "test_acc": s.get("test/acc"), "eval_acc": s.get("bench/eval_accuracy"), "num_images": None,
                "attack": get3("attack") if "bench/attack_ara" in s else None, "btr": get3("btr"),
                "ensemble": get3("ensemble") if "bench/ensemble_ara" in s else None,
                "robust_acc": {k.split("@")[1]: v for k, v in s.items() if k.startswith("bench/robust_acc_ensemble@")},
                "train_seconds": s.get("bench/train_seconds"), "steps": s.get("bench/steps"),
                "seconds_per_step": s.get("bench/seconds_per_step"), "epochs": None, "budget_minutes": None,
                "protocol": None, "warnings": [],
            })
        log.info("W&B: %d run(s) with bench/* metrics from %s", len(rows), path)
        return rows
    except Exception as err:  # noqa: BLE001 - network, auth, missing project: skip, do not fail the summary
        log.warning("W&B: could not pull runs from %s (%s: %s); using local files only", path, type(err).__name__, err)
        return []


def setting_value(v: Any) -> Any:
    """A sweep setting as compared and printed: numbers as floats (``psi0=440`` from the command line equals the config's 440.0)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _show(v: Any) -> str:
    v = setting_value(v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def settings_key(r: dict[str, Any]) -> str:
    """Identity of a run's settings: its family and the sweep settings (not the seed)."""
    return json.dumps([r["family"], [setting_value(r["method"].get(k)) for k in SWEEP_KEYS]])


def label_rows(rows: list[dict[str, Any]]) -> None:
    """Give each row a short label: family plus the sweep settings that vary within its family.

    ``base_label`` / ``base_setting`` name the settings only; where runs with the same settings
    differ in their seed, ``label`` and ``setting`` also carry ``seed=N``.
    """
    fams: dict[str, list[dict]] = {}
    for r in rows:
        fams.setdefault(r["family"], []).append(r)
    same: dict[str, set] = {}
    for r in rows:
        same.setdefault(settings_key(r), set()).add(r.get("seed"))
    for fam, rs in fams.items():
        varying = [k for k in SWEEP_KEYS if len({json.dumps(setting_value(r["method"].get(k))) for r in rs}) > 1]
        for r in rs:
            r["base_setting"] = ", ".join(f"{SHORT.get(k, k)}={_show(r['method'].get(k))}" for k in varying)
            r["base_label"] = fam + (f" ({r['base_setting']})" if r["base_setting"] else "")
            seeded = len(same[settings_key(r)]) > 1
            r["setting"] = ", ".join(x for x in (r["base_setting"], f"seed={r.get('seed')}" if seeded else "") if x)
            r["label"] = fam + (f" ({r['setting']})" if r["setting"] else "")


def seed_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per family and settings: accuracy and ARAs averaged over its seeds (call after :func:`label_rows`).

    Each ARA becomes (mean, smallest, largest) over the seeds (not a CI); ``seeds`` lists them.
    A setting run with one seed passes through with its own values. Rows made before
    :func:`label_rows` kept ``base_*`` (older rows.json files) are named by their ``label``.
    """
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(settings_key(r), []).append(r)
    out = []
    for rs in groups.values():
        r0 = rs[0]
        m = {"family": r0["family"], "method": r0["method"], "base_setting": r0.get("base_setting", r0.get("setting", "")),
             "base_label": r0.get("base_label", r0.get("label", r0["family"]))}
        m.update(label=m["base_label"], setting=m["base_setting"], seeds=sorted(str(r.get("seed")) for r in rs))
        accs = [r["test_acc"] for r in rs if r["test_acc"] is not None]
        m["test_acc"] = sum(accs) / len(accs) if len(accs) == len(rs) else None
        m["test_acc_range"] = (min(accs), max(accs)) if accs else None
        for k in ("attack", "btr", "ensemble"):
            vals = [r[k][0] for r in rs if r.get(k)]
            m[k] = (sum(vals) / len(vals), min(vals), max(vals)) if vals and len(vals) == len(rs) else None
        out.append(m)
    return out


def _fmt(x, nd=4) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _fmt_ara(a) -> str:
    return "" if a is None else f"{a[0]:.4f} [{a[1]:.4f}, {a[2]:.4f}]"


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (x up, y up), sorted by x."""
    pts = sorted(set(points), key=lambda p: (-p[0], -p[1]))
    front, best_y = [], -math.inf
    for x, y in pts:
        if y > best_y:
            front.append((x, y))
            best_y = y
    return sorted(front)


def target_check(rows: list[dict], compare: list[str], against: str, ratio: float, max_drop: float) -> list[str]:
    """For each run of ``against``: the best ``compare`` run within ``max_drop`` clean accuracy, and its BTR ARA ratio."""
    lines = []
    base = [r for r in rows if r["family"] == against and r["btr"] and r["test_acc"] is not None]
    cands = [r for r in rows if r["family"] in compare and r["btr"] and r["test_acc"] is not None]
    for p in sorted(base, key=lambda r: r["test_acc"]):
        # "No more than max_drop lower" is inclusive; the accuracies went through float32, hence the slack.
        ok = [q for q in cands if q["test_acc"] >= p["test_acc"] - max_drop - 1e-6]
        if not ok:
            lines.append(f"- vs {p['label']} (acc {p['test_acc']:.4f}, BTR ARA {p['btr'][0]:.4f}): no {'/'.join(compare)} run "
                         f"within {100 * max_drop:.0f} points of its accuracy -> **not met**")
            continue
        q = max(ok, key=lambda r: r["btr"][0])
        rr = q["btr"][0] / max(p["btr"][0], 1e-12)
        lines.append(f"- vs {p['label']} (acc {p['test_acc']:.4f}, BTR ARA {p['btr'][0]:.4f}): best {q['label']} "
                     f"(acc {q['test_acc']:.4f}, BTR ARA {q['btr'][0]:.4f}) = **{rr:.2f}x** -> "
                     f"**{'met' if rr >= ratio else 'not met'}** (target >= {ratio}x)")
    return lines


def reference_rows(dirs: list[Path]) -> list[dict[str, Any]]:
    """eval.py outputs (one JSON per checkpoint) found in ``dirs``; folders without JSONs are skipped."""
    rows = []
    for d in dirs:
        files = sorted(d.glob("*.json")) if d.is_dir() else ([d] if d.suffix == ".json" else [])
        if not files:
            log.info("reference %s: no eval JSON (yet), skipped", d)
        for f in files:
            try:
                res = json.loads(f.read_text())
            except json.JSONDecodeError:
                log.warning("reference %s: not JSON, skipped", f)
                continue
            if "accuracy" not in res or "attack" not in res:
                continue
            s = res.get("settings", {})
            rows.append({"name": f.stem, "source": str(f), "accuracy": res["accuracy"], "num_images": res.get("num_images"),
                         "attack": _ara(res.get("attack")), "btr": _ara(res.get("btr")), "ensemble": _ara(res.get("ensemble")),
                         "protocol": s.get("protocol"), "steps": s.get("steps"), "seconds": res.get("seconds")})
    return rows


def markdown(rows: list[dict], refs: list[dict], checks: list[str], eps_keys: list[str],
             means: list[dict] | None = None, mean_checks: list[str] | None = None) -> str:
    out = []
    if rows:
        n = {r["num_images"] for r in rows}
        prot = {r["protocol"] for r in rows}
        out.append(f"Evaluation: {', '.join(map(str, sorted(x for x in n if x)))} test images, protocol "
                   f"{', '.join(sorted(str(p) for p in prot))}; ARA with bootstrap 95% CIs; robust accuracy from the "
                   "ensemble r_i (per-image minimum of the paper search and the independent attack).\n")
        std = [r["seconds_per_step"] for r in rows if r["family"] == "standard" and r["seconds_per_step"]]
        head = ["method", "setting", "test acc", "attack ARA [95% CI]", "BTR ARA [95% CI]", "ensemble ARA [95% CI]",
                *[f"rob. acc @{e}" for e in eps_keys], "train s", "steps", "epochs", "s/step", "x standard"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in rows:
            rel = r["seconds_per_step"] / std[0] if std and r["seconds_per_step"] else None
            out.append("| " + " | ".join([
                r["family"], r["setting"] or "default", _fmt(r["test_acc"]), _fmt_ara(r["attack"]), _fmt_ara(r["btr"]),
                _fmt_ara(r["ensemble"]), *[_fmt(r["robust_acc"].get(e), 3) for e in eps_keys],
                _fmt(r["train_seconds"], 0), str(r["steps"] or ""), _fmt(r["epochs"], 2), _fmt(r["seconds_per_step"], 3),
                _fmt(rel, 2)]) + " |")
        warn = [(r["label"], r["warnings"]) for r in rows if r["warnings"]]
        if warn:
            out.append("\nWarnings from the evaluation (per run):\n")
            out.extend(f"- {lab}: " + " ".join(ws) for lab, ws in warn)
    if checks:
        out.append("\nTarget check (BTR ARA of the best robust/all run within 3 accuracy points, against each PGD-AT run):\n")
        out.extend(checks)
    if means and any(len(m["seeds"]) > 1 for m in means):
        out.append("\nSeed means (settings run with several seeds; [smallest, largest] over the seeds, not a CI):\n")
        out.append("| method | setting | seeds | test acc [range] | attack ARA [range] | BTR ARA [range] | ensemble ARA [range] |")
        out.append("|---|---|---|---|---|---|---|")
        for m in means:
            if len(m["seeds"]) > 1:
                acc = None if m["test_acc"] is None else (m["test_acc"], *m["test_acc_range"])
                out.append(f"| {m['family']} | {m['setting'] or 'default'} | {', '.join(m['seeds'])} | {_fmt_ara(acc)} | "
                           f"{_fmt_ara(m['attack'])} | {_fmt_ara(m['btr'])} | {_fmt_ara(m['ensemble'])} |")
        if mean_checks:
            out.append("\nTarget check on seed means (each setting's mean over its seeds; one-seed settings as they are):\n")
            out.extend(mean_checks)
    if refs:
        out.append("\nReference networks (eval.py JSONs):\n")
        out.append("| network | images | protocol | accuracy | attack ARA [95% CI] | BTR ARA [95% CI] | ensemble ARA [95% CI] |")
        out.append("|---|---|---|---|---|---|---|")
        for r in refs:
            out.append(f"| {r['name']} | {r['num_images']} | {r['protocol']} (T={r['steps']}) | {_fmt(r['accuracy'])} | "
                       f"{_fmt_ara(r['attack'])} | {_fmt_ara(r['btr'])} | {_fmt_ara(r['ensemble'])} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("btr", "BTR ARA (paper's attack engine)"), ("ensemble", "Attack ARA (ensemble: paper engine + independent)")]
    panels = [p for p in panels if any(r[p[0]] for r in rows)] or [("attack", "Attack ARA")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        pts = [r for r in rows if r[key] and r["test_acc"] is not None]
        fams = sorted({r["family"] for r in pts}, key=lambda f: list(COLORS).index(f) if f in COLORS else 99)
        for fam in fams:
            rs = sorted([r for r in pts if r["family"] == fam], key=lambda r: r["test_acc"])
            c = COLORS.get(fam)
            xs = [r["test_acc"] for r in rs]
            ys = [r[key][0] for r in rs]
            yerr = [[max(0.0, r[key][0] - r[key][1]) for r in rs], [max(0.0, r[key][2] - r[key][0]) for r in rs]]
            ax.errorbar(xs, ys, yerr=yerr, fmt="o-" if len(rs) > 1 else "o", color=c, capsize=3, label=fam, lw=1, ms=5)
            for r in rs:
                if r["setting"]:
                    ax.annotate(r["setting"], (r["test_acc"], r[key][0]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = pareto([(r["test_acc"], r[key][0]) for r in pts])
        if len(front) > 1:
            ax.plot(*zip(*front), ls="--", color="k", lw=0.8, alpha=0.6, label="Pareto frontier")
        ax.set_xlabel("clean test accuracy")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, png)


def save_figure(fig, png: Path) -> None:
    """Write ``fig`` to ``png`` atomically (a killed run never leaves half a PNG) and close it."""
    from robustx.explain.figures import save_png

    fig.tight_layout()
    save_png(fig, png, dpi=120, close=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="*", type=Path, help="multirun/run folders (searched for bench.json) or bench.json files")
    p.add_argument("--out", type=Path, required=True, help="folder for summary.md, rows.json, tradeoff.png")
    p.add_argument("--reference", nargs="*", type=Path, default=[], help="folders of eval.py JSONs (reference rows)")
    p.add_argument("--wandb", default=None, help="ENTITY/PROJECT to also pull runs from (skipped offline)")
    p.add_argument("--wandb-group", default=None)
    p.add_argument("--compare", default="robust,all", help="families checked against --against (comma-separated)")
    p.add_argument("--against", default="pgd")
    p.add_argument("--ratio", type=float, default=1.5, help="target BTR ARA ratio")
    p.add_argument("--max-drop", type=float, default=0.03, help="allowed clean-accuracy drop (fraction)")
    p.add_argument("--title", default="Accuracy vs robustness at equal compute")
    p.add_argument("--btr-from", nargs="*", type=Path, default=None,
                   help="folders of BTR re-evaluations (scripts/recheck_paper_protocol.sh OUT): use their BTR ARA "
                        "and leave out runs without one")
    p.add_argument("--attack-from", nargs="*", type=Path, default=None,
                   help="folders of Attack + ensemble re-evaluations (recheck_paper_protocol.sh MODE=attack OUT): use "
                        "their Attack and ensemble ARAs and leave out runs without one")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    files = find_bench_files(args.dirs)
    rows = []
    for f in files:
        try:
            rows.append(row_from_bench(f, json.loads(f.read_text())))
        except (json.JSONDecodeError, KeyError) as err:
            log.warning("skipping %s (%s: %s)", f, type(err).__name__, err)
    if args.wandb:
        rows.extend(rows_from_wandb(args.wandb, args.wandb_group))
    for kind, dirs, flag in (("btr", args.btr_from, "--btr-from"), ("attack", args.attack_from, "--attack-from")):
        if dirs is None:
            continue
        found = bool(rows)
        rows = apply_rechecks(rows, dirs, kind=kind)
        if found and not rows:
            log.error("%s: no run has %s re-evaluation of its own images under %s (make them with %s)",
                      flag, RECHECK_KINDS[kind]["a"], ", ".join(map(str, dirs)) or "-", RECHECK_KINDS[kind]["make"])
            return 1
    refs = reference_rows(args.reference)
    if not rows and not refs:
        log.error("no bench.json found under %s (and no reference rows)", ", ".join(map(str, args.dirs)) or "-")
        return 1
    order = list(COLORS)
    rows.sort(key=lambda r: (order.index(r["family"]) if r["family"] in order else 99, r["family"], r["test_acc"] or 0))
    label_rows(rows)
    eps_keys = sorted({k for r in rows for k in r["robust_acc"]}, key=float)
    checks = target_check(rows, args.compare.split(","), args.against, args.ratio, args.max_drop) if rows else []
    means = seed_means(rows)
    seeded = any(len(m["seeds"]) > 1 for m in means)
    mean_checks = target_check(means, args.compare.split(","), args.against, args.ratio, args.max_drop) if seeded else []
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(markdown(rows, refs, checks, eps_keys, means, mean_checks))
    (args.out / "rows.json").write_text(json.dumps({"rows": rows, "reference": refs, **({"seed_means": means} if seeded else {})}, indent=1))
    if rows:
        plot(rows, args.out / "tradeoff.png", args.title)
    print((args.out / "summary.md").read_text())
    log.info("wrote %s", ", ".join(str(args.out / n) for n in ("summary.md", "rows.json", "tradeoff.png") if (args.out / n).exists()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
