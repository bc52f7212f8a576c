"""study.py's job: invalidation study, Grad-CAM manipulation and faithfulness of checkpoints on a fixed test subset.

Per checkpoint, on the same fixed-seed test images: :func:`robustx.invalidation.invalidation_study`
(minimal perturbation, then every method's maps before and after), deletion/insertion AUC
(:mod:`robustx.faithfulness`) of every method's clean map of the true class (the same maps the
study computed) and :func:`robustx.invalidation.manipulation_attack`. Writes ``<stem>.json``
per checkpoint, ``invalidation``, ``manipulation`` and ``faithfulness`` tables (``.md`` and
``.csv``, networks side by side) and figures into the run directory.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import robustx
from robustx.attribution import METHODS
from robustx.faithfulness import deletion_auc, insertion_auc, random_maps
from robustx.invalidation import (
    INVALIDATION_METRICS,
    MANIPULATION_METRICS,
    invalidation_study,
    manipulation_attack,
    summarize_invalidation,
    summarize_values,
)

from .loading import checkpoint_paths, load_classifier

log = logging.getLogger(__name__)


def _settings(cfg: DictConfig) -> dict[str, Any]:
    """All study settings as a plain dict, validated (one-line ValueErrors naming the key)."""
    out = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("study", "attack", "maps", "manipulation", "faithfulness", "figures")}
    st = out["study"]
    bad = [m for m in st["methods"] if m not in METHODS]
    if bad or not st["methods"]:
        raise ValueError(f"study.methods has unknown method(s) {bad or '[] (empty)'}; choose from {', '.join(METHODS)}.")
    if int(st["num_images"]) < 1 or int(st["batch_size"]) < 1:
        raise ValueError(f"study.num_images and study.batch_size must be >= 1, got {st['num_images']} and {st['batch_size']}.")
    if not 0 < float(st["frac"]) <= 1:
        raise ValueError(f"study.frac must be in (0, 1] (share of pixels in the top region), got {st['frac']}.")
    a = out["attack"]
    if int(a["steps"]) < 1 or not float(a["eps"]) > 0:
        raise ValueError(f"attack.steps must be >= 1 and attack.eps > 0, got {a['steps']} and {a['eps']}.")
    f = out["faithfulness"]
    for k in ("deletion_baseline", "insertion_baseline"):
        if f[k] not in ("zero", "blur", "mean"):
            raise ValueError(f"faithfulness.{k} must be zero, blur or mean, got '{f[k]}'.")
    if int(f["steps"]) < 1:
        raise ValueError(f"faithfulness.steps must be >= 1, got {f['steps']}.")
    m = out["manipulation"]
    if m["num_images"] is not None and int(m["num_images"]) < 1:
        raise ValueError(f"manipulation.num_images must be >= 1 or null (all), got {m['num_images']}.")
    return out


def _json_safe(v: Any) -> Any:
    """NaN / inf floats -> None (strict JSON), recursively; tensors -> lists."""
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, torch.Tensor):
        return _json_safe(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "robustx": robustx.__version__,
            "machine": platform.machine(), "threads": str(torch.get_num_threads())}


class _Clock:
    """Logs '<network>: <stage> done in S s (total T s)' after each stage and keeps the stage seconds."""

    def __init__(self, name: str) -> None:
        self.name, self.start, self.last, self.stages = name, time.time(), time.time(), {}

    def __call__(self, stage: str) -> None:
        now = time.time()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - self.last
        log.info("%s: %s done in %.1f s (total %.1f s)", self.name, stage, now - self.last, now - self.start)
        self.last = now

    @property
    def total(self) -> float:
        return time.time() - self.start


def _map_options(s: dict[str, Any]) -> dict[str, Any]:
    return dict(s["maps"])


def _faithfulness(model, x, y, maps: dict[str, torch.Tensor], s: dict[str, Any], bootstrap: int) -> dict[str, Any]:
    """Deletion and insertion AUC of each map (and random maps) -> {method: {deletion, insertion: per-image, *_stats}}."""
    f = s["faithfulness"]
    kw = dict(steps=int(f["steps"]), blur_kernel=int(f["blur_kernel"]), blur_sigma=float(f["blur_sigma"]),
              batch_size=int(f["batch_size"]), seed=int(f["seed"]))
    named = dict(maps)
    if f["random_reference"]:
        named["random"] = random_maps(tuple(next(iter(maps.values())).shape), seed=int(f["seed"]), device=x.device)
    out = {}
    for name, m in named.items():
        d = deletion_auc(model, x, m.to(x.device), y, baseline=f["deletion_baseline"], **kw)
        i = insertion_auc(model, x, m.to(x.device), y, baseline=f["insertion_baseline"], **kw)
        out[name] = {"deletion": d.tolist(), "insertion": i.tolist()}
    return out


def _summarize_faithfulness(per: dict[str, Any], bootstrap: int, seed: int) -> dict[str, Any]:
    return {m: {k: summarize_values(v[k], bootstrap=bootstrap, seed=seed) for k in ("deletion", "insertion")} for m, v in per.items()}


def study_checkpoint(path: Path, x: torch.Tensor, y: torch.Tensor, ids: list[int], s: dict[str, Any], *, device: str,
                     class_names: list[str] | None, out_dir: Path) -> dict[str, Any]:
    """Run the three parts on one checkpoint; writes its figure grid; returns the JSON-able result.

    Args:
        path: checkpoint file.
        x: (N, C, H, W) test images in [0, 1]; y: (N,) labels; ids: (N,) dataset indices.
        s: :func:`_settings`.
    """
    from robustx.study_figures import invalidation_grid

    model, info = load_classifier(path)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    clock = _Clock(path.stem)
    st, a, mo = s["study"], s["attack"], _map_options(s)
    boot, seed = int(st["bootstrap"]), int(st["seed"])
    records: list[dict] = []
    faith_per: dict[str, dict[str, list]] = {}
    fig_parts: dict[str, Any] | None = None
    correct_x, correct_y, correct_ids = [], [], []
    n_correct = 0
    bs = int(st["batch_size"])
    for start in range(0, x.size(0), bs):
        xb, yb = x[start : start + bs].to(device), y[start : start + bs].to(device)
        res = invalidation_study(
            model, xb, yb, methods=st["methods"], attack_steps=int(a["steps"]), attack_eps=float(a["eps"]),
            attack_momentum=float(a["momentum"]), attack_clip=bool(a["clip"]),
            autocast_dtype=torch.bfloat16 if a["bf16"] else None, frac=float(st["frac"]), map_options=mo,
            compare_original_class=bool(st["compare_original_class"]), noise_control=bool(st["noise_control"]),
            noise_seed=seed + start, ids=ids[start : start + bs], bootstrap=0,
            keep_tensors=True, progress=lambda label: clock(f"invalidation: {label}"),
        )
        records += res["records"]
        n_correct += res["num_correct"]
        t = res.get("tensors")
        if t is None:
            continue
        correct_x.append(t["clean"])
        correct_y.append(t["labels"])
        correct_ids += list(t["ids"])
        if s["faithfulness"]["enabled"]:
            xc, yc = t["clean"].to(device), t["labels"].to(device)
            part = _faithfulness(model, xc, yc, t["maps_clean"], s, boot)
            for m, v in part.items():
                faith_per.setdefault(m, {"deletion": [], "insertion": []})
                faith_per[m]["deletion"] += v["deletion"]
                faith_per[m]["insertion"] += v["insertion"]
            clock("faithfulness (deletion/insertion AUC)")
        if fig_parts is None:
            fig_parts = t
    result: dict[str, Any] = {
        "checkpoint": str(path), "format": info["format"], "num_images": x.size(0), "num_correct": n_correct,
        "accuracy": n_correct / max(1, x.size(0)), "ids": ids,
    }
    result["invalidation"] = {"summary": summarize_invalidation(records, st["methods"], bootstrap=boot, seed=seed), "records": records}
    if s["faithfulness"]["enabled"]:
        result["faithfulness"] = {"summary": _summarize_faithfulness(faith_per, boot, seed), "per_image": faith_per,
                                  "targets": "true class on the correctly classified clean images"}
    if fig_parts is not None:
        changed = [j for j, r in enumerate(r for r in records if r["id"] in set(fig_parts["ids"])) if r["changed"]]
        pick = changed[: int(s["figures"]["num_examples"])]
        if pick:
            idx = torch.tensor(pick)
            invalidation_grid(
                out_dir / f"{path.stem}_maps.png", clean=fig_parts["clean"][idx], adversarial=fig_parts["adversarial"][idx],
                maps_clean={m: v[idx] for m, v in fig_parts["maps_clean"].items()},
                maps_adv={m: v[idx] for m, v in fig_parts["maps_adv"].items()},
                labels=fig_parts["labels"][idx].tolist(), preds=fig_parts["pred_adv"][idx].tolist(),
                r=fig_parts["r"][idx].tolist(), class_names=class_names,
                title=f"{path.stem}: clean map of the true class vs map of the new class after the minimal attack",
            )
    m = s["manipulation"]
    if m["enabled"] and not correct_x:
        result["manipulation"] = {"num_images": 0, "num_correct": 0, "budgets": []}
    if m["enabled"] and correct_x:
        xm, ym = torch.cat(correct_x), torch.cat(correct_y)
        k = xm.size(0) if m["num_images"] is None else min(int(m["num_images"]), xm.size(0))
        man = manipulation_attack(
            model, xm[:k].to(device), ym[:k].to(device), layer=mo.get("layer"), budgets=[float(b) for b in m["budgets"]],
            steps=int(m["steps"]), map_weight=float(m["map_weight"]), lr=float(m["lr"]), kappa=float(m["kappa"]),
            clip=bool(m["clip"]), frac=float(st["frac"]), baseline=bool(m["baseline"]), ids=correct_ids[:k], bootstrap=boot,
            progress=lambda label: clock(label),
        )
        result["manipulation"] = man
    result["seconds"] = {"total": clock.total, "stages": clock.stages}
    return result


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _fmt(stats: dict[str, Any] | None, digits: int = 3) -> str:
    if not stats or stats.get("n", 0) == 0 or stats["mean"] is None or math.isnan(stats["mean"]):
        return "n/a"
    ci = "" if math.isnan(stats["ci_low"]) else f" [{stats['ci_low']:.{digits}f}, {stats['ci_high']:.{digits}f}]"
    return f"{stats['mean']:.{digits}f}{ci}"


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _num(v: Any) -> Any:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v


_METRIC_TEXT = {
    "spearman": "Spearman(M(x', y'), M(x, y))",
    "top_overlap": "top-20% overlap(M(x', y'), M(x, y))",
    "energy_in_top": "share of ||delta||^2 inside top-20% of M(x, y)",
    "spearman_orig_class": "Spearman(M(x', y), M(x, y))",
    "top_overlap_orig_class": "top-20% overlap(M(x', y), M(x, y))",
    "spearman_noise": "noise control: Spearman(M(x + n, y), M(x, y)), Gaussian n with RMSE(n) = RMSE(delta)",
    "top_overlap_noise": "noise control: top-20% overlap(M(x + n, y), M(x, y))",
}


def write_tables(results: list[dict[str, Any]], out_dir: Path, settings: dict[str, Any]) -> dict[str, Path]:
    """invalidation/manipulation/faithfulness .md and .csv with the networks side by side -> {name: md path}."""
    nets = [Path(r["checkpoint"]).stem for r in results]
    frac = settings["study"]["frac"]
    written = {}
    stat_cols = ["mean", "ci_low", "ci_high", "median", "n"]
    # invalidation
    methods = settings["study"]["methods"]
    metrics = [k for k in INVALIDATION_METRICS if any(k in r["invalidation"]["summary"]["methods"][m] for r in results for m in methods)]
    md = [f"Minimal attack (paper search) flips the prediction y -> y'; M(image, class) is a method's map; top region = top {frac:.0%} of pixels. "
          "Means over the images whose prediction changed, with 95% bootstrap CIs.\n"]
    md.append(_md_table(["", *nets], [
        ["images / correct / changed", *[f"{r['num_images']} / {r['num_correct']} / {r['invalidation']['summary']['n_changed']}" for r in results]],
        ["found by the search but not flipped in the fp32 re-check (left out)",
         *[str(r["invalidation"]["summary"].get("n_found_not_rechecked", "n/a")) for r in results]],
        ["perturbation RMSE r (mean [CI])", *[_fmt(r["invalidation"]["summary"]["r"], 4) for r in results]],
        ["median r", *[f"{r['invalidation']['summary']['r']['median']:.4f}" for r in results]],
        *([["noise control: share of images whose prediction survives Gaussian noise of RMSE r",
            *[f"{r['invalidation']['summary'].get('noise_keeps_prediction', float('nan')):.2f}" for r in results]]]
          if any("noise_keeps_prediction" in r["invalidation"]["summary"] for r in results) else []),
    ]))
    csv_rows = []
    for k in metrics:
        md.append(f"\n**{k}**: {_METRIC_TEXT.get(k, k)}" + (f" (chance level {frac:g} for independent maps / an even perturbation)" if k in ("top_overlap", "energy_in_top", "top_overlap_orig_class", "top_overlap_noise") else "") + "\n")
        rows = []
        for m in methods:
            stats = [r["invalidation"]["summary"]["methods"][m].get(k) for r in results]
            rows.append([m, *[_fmt(st) for st in stats]])
            csv_rows.append([m, k, *[_num((st or {}).get(c)) for st in stats for c in stat_cols]])
        md.append(_md_table(["method", *nets], rows))
    _write_text(out_dir / "invalidation.md", "\n".join(md))
    _write_csv(out_dir / "invalidation.csv", ["method", "metric", *[f"{n}_{c}" for n in nets for c in stat_cols]], csv_rows)
    written["invalidation"] = out_dir / "invalidation.md"
    # manipulation
    if all("manipulation" in r for r in results):
        keys = []
        for r in results:
            for row in r["manipulation"]["budgets"]:
                if (row["budget"], row["variant"]) not in keys:
                    keys.append((row["budget"], row["variant"]))
        find = lambda r, key: next((x for x in r["manipulation"]["budgets"] if (x["budget"], x["variant"]) == key), None)  # noqa: E731
        md_rows, csv_rows = [], []
        for key in keys:
            cells, cells_csv = [], []
            for r in results:
                row = find(r, key)
                if row is None:
                    cells.append("n/a")
                    cells_csv += [""] * (2 + 3 * len(MANIPULATION_METRICS))
                    continue
                cells.append(f"{row['success_rate']:.2f} ({row['n']}) | {_fmt(row['spearman_new_class'])} | {_fmt(row['top_overlap_new_class'])}")
                cells_csv += [row["success_rate"], row["n"]]
                cells_csv += [_num(row[k][c]) for k in MANIPULATION_METRICS for c in ("mean", "ci_low", "ci_high")]
            md_rows.append([f"{key[0]:g}", key[1], *cells])
            csv_rows.append([key[0], key[1], *cells_csv])
        sub = ["success rate (n)", "Grad-CAM Spearman, new class vs clean", "top-20% overlap"]
        header = ["RMSE budget", "attack", *[f"{n}: " + " | ".join(sub) for n in nets]]
        text = ("Flip the prediction inside an RMSE budget; map-preserving = also minimize 1 - cos(Grad-CAM of the new class on the "
                "manipulated image, clean Grad-CAM of the true class); plain = the same attack without the map term. "
                "Similarities are means [95% bootstrap CI] over the successful images.\n\n")
        # a markdown cell cannot hold '|': split into real columns
        header = ["RMSE budget", "attack"] + [f"{n}: {c}" for n in nets for c in sub]
        md_rows = [[r[0], r[1], *[c for cell in r[2:] for c in cell.split(" | ")]] for r in md_rows]
        _write_text(out_dir / "manipulation.md", text + _md_table(header, md_rows))
        _write_csv(out_dir / "manipulation.csv", ["budget", "variant", *[f"{n}_{c}" for n in nets for c in (
            "success_rate", "n", *[f"{k}_{s}" for k in MANIPULATION_METRICS for s in ("mean", "ci_low", "ci_high")])]], csv_rows)
        written["manipulation"] = out_dir / "manipulation.md"
    # faithfulness
    if all("faithfulness" in r for r in results):
        names = list(dict.fromkeys(m for r in results for m in r["faithfulness"]["summary"]))
        f = settings["faithfulness"]
        md_rows, csv_rows = [], []
        for m in names:
            cells, cells_csv = [], []
            for r in results:
                st = r["faithfulness"]["summary"].get(m, {})
                cells += [_fmt(st.get("deletion")), _fmt(st.get("insertion"))]
                cells_csv += [_num((st.get(k) or {}).get(c)) for k in ("deletion", "insertion") for c in ("mean", "ci_low", "ci_high", "n")]
            md_rows.append([m, *cells])
            csv_rows.append([m, *cells_csv])
        text = (f"Deletion / insertion AUC (Petsiuk et al. 2018) of each method's clean map of the true class on the correctly "
                f"classified images: {f['steps']} steps, deletion to '{f['deletion_baseline']}', insertion from '{f['insertion_baseline']}'. "
                "Deletion: lower is more faithful; insertion: higher. Means [95% bootstrap CI].\n\n")
        header = ["method", *[f"{n}: {k}" for n in nets for k in ("deletion AUC (lower better)", "insertion AUC (higher better)")]]
        _write_text(out_dir / "faithfulness.md", text + _md_table(header, md_rows))
        _write_csv(out_dir / "faithfulness.csv", ["method", *[f"{n}_{k}_{c}" for n in nets for k in ("deletion", "insertion")
                                                              for c in ("mean", "ci_low", "ci_high", "n")]], csv_rows)
        written["faithfulness"] = out_dir / "faithfulness.md"
    return written


def run_study(cfg: DictConfig) -> list[dict[str, Any]]:
    """The study for every checkpoint in ``cfg.ckpt``; outputs go to the run directory (``paths.output_dir``)."""
    from robustx.study_figures import manipulation_plot

    paths = checkpoint_paths(cfg.ckpt)
    settings = _settings(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg["limit_test"] = int(settings["study"]["num_images"])
    dm = hydra.utils.instantiate(data_cfg, _convert_="all")
    dm.prepare_data()
    dm.setup("test")
    ds = dm.test_set
    ids = list(range(len(ds)))
    x = torch.stack([ds[j][0] for j in ids])  # (N, C, H, W)
    y = torch.tensor([int(ds[j][1]) for j in ids])
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_info = {k: data_cfg.get(k) for k in ("_target_", "root", "limit_test", "val_seed")}
    log.info("study of %d checkpoint(s) on %d test images; settings %s", len(paths), len(ids), json.dumps(settings))
    results = []
    for p in paths:
        res = study_checkpoint(p, x, y, ids, settings, device=str(cfg.device), class_names=getattr(dm, "class_names", None),
                               out_dir=out_dir)
        res.update({"settings": settings, "data": data_info, "versions": _versions()})
        tmp = out_dir / f".{p.stem}.json.tmp"
        tmp.write_text(json.dumps(_json_safe(res), indent=1, allow_nan=False))
        os.replace(tmp, out_dir / f"{p.stem}.json")
        summ = res["invalidation"]["summary"]
        log.info("%s: accuracy %.3f, %d of %d correct images flipped (median r %.4f); %.1f s -> %s", p.name, res["accuracy"],
                 summ["n_changed"], summ["n_correct"], summ["r"]["median"], res["seconds"]["total"], out_dir / f"{p.stem}.json")
        results.append(res)
    written = write_tables(results, out_dir, settings)
    if all("manipulation" in r for r in results):
        manipulation_plot(out_dir / "manipulation.png", {Path(r["checkpoint"]).stem: r["manipulation"]["budgets"] for r in results})
    log.info("tables: %s", ", ".join(str(v) for v in written.values()))
    return results
