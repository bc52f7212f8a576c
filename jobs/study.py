"""study.py's job: invalidation study, Grad-CAM manipulation and faithfulness of checkpoints on a fixed test subset.

Per checkpoint, on the same fixed-seed test images: :func:`robustx.explain.invalidation.invalidation_study`
(minimal perturbation, then every method's maps before and after), deletion/insertion AUC
(:mod:`robustx.explain.faithfulness`) of every method's clean map of the true class (the same maps the
study computed) and :func:`robustx.explain.manipulation.manipulation_attack`. Writes ``<name>.json``
per checkpoint (names from :func:`~jobs.loading.output_stems`: distinct even when
two checkpoints share a file name), ``invalidation``, ``manipulation`` and ``faithfulness``
tables (``.md`` and ``.csv``, networks side by side) and figures into the run directory.

The work runs in batches of ``study.batch_size`` images; after each batch the JSON and the
tables are rewritten (marked partial) and the batch's results are cached on disk (figure
tensors as safetensors), so a killed study resumes where it stopped and ends with the same
outputs as an uninterrupted one. Progress is counted in work (image-steps of the search,
image-maps, ...) by :class:`~jobs.progress.WorkProgress`, with an ETA and one
logged estimate per kind of work.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from robustx.explain.attribution import METHODS
from robustx.explain.faithfulness import deletion_auc, insertion_auc, random_maps
from robustx.explain.invalidation import INVALIDATION_METRICS, invalidation_study, summarize_invalidation
from robustx.explain.manipulation import MANIPULATION_METRICS, manipulation_attack, summarize_manipulation
from robustx.io.files import atomic_path, atomic_write
from robustx.robustness.ara import PROTOCOLS
from robustx.stats import summarize_values

from jobs.loading import checkpoint_paths, load_classifier, output_stems, versions
from jobs.progress import WorkProgress, format_duration

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
    protocol = a.pop("protocol", "paper")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown attack.protocol '{protocol}'; choose one of {sorted(PROTOCOLS)}.")
    for k in ("steps", "eps", "momentum"):
        if a.get(k) is None:
            a[k] = PROTOCOLS[protocol][k]
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


class _Clock:
    """Logs '<network> [batch b/B]: <stage> done in S s' after each stage and adds the seconds to ``stages``.

    The time between two calls goes to the second stage, so every second from :meth:`restart`
    on is counted in some stage.
    """

    def __init__(self, name: str) -> None:
        self.name, self.where, self.last, self.stages = name, "", time.time(), {}

    def restart(self, stages: dict[str, float], where: str = "") -> None:
        self.stages, self.where, self.last = stages, where, time.time()

    def __call__(self, stage: str) -> None:
        now = time.time()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - self.last
        log.info("%s%s: %s done in %.1f s", self.name, self.where, stage, now - self.last)
        self.last = now


def _map_options(s: dict[str, Any]) -> dict[str, Any]:
    return dict(s["maps"])


def _faithfulness(model, x, y, maps: dict[str, torch.Tensor], s: dict[str, Any],
                  on_map: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Deletion and insertion AUC of each map (and random maps) -> {method: {deletion, insertion: per-image lists}}."""
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
        if on_map is not None:
            on_map(name)
    return out


def _nan(values: list) -> list[float]:
    """JSON lists (None for NaN) -> floats."""
    return [math.nan if v is None else float(v) for v in values]


def _summarize_faithfulness(per: dict[str, Any], bootstrap: int, seed: int) -> dict[str, Any]:
    return {m: {k: summarize_values(_nan(v[k]), bootstrap=bootstrap, seed=seed) for k in ("deletion", "insertion")}
            for m, v in per.items()}


# ---------------------------------------------------------------------------------------------
# Work, progress and the per-batch cache
# ---------------------------------------------------------------------------------------------

#: Kinds of work of the study, counted per image (see :func:`_work_per_image`).
SEARCH, MAPS, FAITH, MANIP = "search (image-steps)", "maps (image-maps)", "faithfulness (image-maps)", "manipulation (image-steps)"
#: Bumped when the cached batch files change meaning.
CACHE_FORMAT = 1


def _maps_per_method(s: dict[str, Any]) -> int:
    """Maps per image and method: clean and after the attack, plus the original class's and the noise control's."""
    st = s["study"]
    return 2 + int(bool(st["compare_original_class"])) + int(bool(st["noise_control"]))


def _work_per_image(s: dict[str, Any]) -> dict[str, int]:
    """Units of work per (correctly classified) study image, by kind; manipulation per manipulated image."""
    st, m, f = s["study"], s["manipulation"], s["faithfulness"]
    out = {SEARCH: int(s["attack"]["steps"]), MAPS: len(st["methods"]) * _maps_per_method(s)}
    if f["enabled"]:
        out[FAITH] = len(st["methods"]) + int(bool(f["random_reference"]))
    if m["enabled"]:
        out[MANIP] = len(m["budgets"]) * _manip_variants(m) * int(m["steps"])
    return out


def _manip_variants(m: dict[str, Any]) -> int:
    return 1 + int(bool(m["baseline"]) and float(m["map_weight"]) > 0)


def _manip_quota(s: dict[str, Any], n: int) -> int:
    """How many correctly classified images the manipulation attacks (at most), of ``n`` study images."""
    q = s["manipulation"]["num_images"]
    return n if q is None else min(int(q), n)


def _quick_hint(s: dict[str, Any]) -> str:
    """What to override for a quick look (the WorkProgress hint of a long estimate)."""
    st, a, mp, m = s["study"], s["attack"], s["maps"], s["manipulation"]
    quick = []
    if int(st["num_images"]) > 10:
        quick.append("study.num_images=10")
    cheaper = []
    if int(a["steps"]) > 100:
        cheaper.append("attack.steps=100")
    if "lime" in st["methods"] and int(mp["lime_samples"]) > 50:
        cheaper.append("maps.lime_samples=50")
    if m["enabled"] and int(m["steps"]) > 25:
        cheaper.append("manipulation.steps=25")
    if m["enabled"] and (m["num_images"] is None or int(m["num_images"]) > 5):
        cheaper.append("manipulation.num_images=5")
    parts = [" ".join(quick)] if quick else []
    if cheaper:
        parts.append(" ".join(cheaper) + " (not the paper's protocol)")
    return ("For a quick look: " + " or ".join(parts) + "; a rerun with the same settings resumes from the cache") if parts else ""


def _settle(progress: WorkProgress, kind: str, target: float) -> None:
    """Mark ``kind`` done up to ``target`` units without timing them (cached, or images needing no work)."""
    if kind in progress.kinds:
        progress.finish(kind, target, timed=False)


def _cache_settings(s: dict[str, Any]) -> dict[str, Any]:
    """What a cached batch depends on: not the summaries' bootstrap, the figures, nor the manipulation (cached apart)."""
    study = {k: v for k, v in s["study"].items() if k != "bootstrap"}
    return {"format": CACHE_FORMAT, "study": study, "attack": s["attack"], "maps": s["maps"], "faithfulness": s["faithfulness"]}


def _manip_tag(s: dict[str, Any]) -> str:
    """Short digest of what a batch's manipulation depends on (not manipulation.num_images: ids are checked instead)."""
    m = {k: v for k, v in s["manipulation"].items() if k not in ("num_images", "enabled")}
    m.update(frac=s["study"]["frac"], layer=s["maps"]["layer"], format=CACHE_FORMAT)
    return hashlib.sha1(json.dumps(m, sort_keys=True).encode()).hexdigest()[:10]


def _save_json(path: Path | None, rec: dict[str, Any]) -> None:
    """Write a cache file atomically (robustx.io.files)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(_json_safe(rec), allow_nan=False))


def _load_json(path: Path | None, ids: list[int], needs: tuple[str, ...]) -> dict[str, Any] | None:
    """A cached batch file if it is readable, of the same images and complete; otherwise None (with a warning)."""
    if path is None or not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("ignoring corrupt cache file %s (%s); recomputing it", path, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None
    if not isinstance(rec, dict) or rec.get("ids") != ids or any(k not in rec for k in needs):
        log.warning("ignoring cache file %s: not the expected images or incomplete; recomputing it", path)
        return None
    return rec


def _save_tensors(path: Path | None, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    if path is None:
        return
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def _load_tensors(path: Path, n: int) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
    except Exception as err:  # a truncated or foreign file raises several types
        log.warning("ignoring corrupt cache file %s (%s); recomputing its batch", path, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None
    if t.get("ids") is None or t["ids"].numel() != n:
        log.warning("ignoring cache file %s: not the expected figure images; recomputing its batch", path)
        return None
    return t


def _fig_pack(t: dict[str, Any], pick: list[int]) -> dict[str, torch.Tensor]:
    """The figure's tensors of the images ``pick`` (positions in :func:`invalidation_study`'s tensors), flat names."""
    idx = torch.tensor(pick, dtype=torch.long)
    out = {"ids": torch.tensor(t["ids"], dtype=torch.long)[idx], "labels": t["labels"][idx], "pred_adv": t["pred_adv"][idx],
           "r": t["r"][idx], "clean": t["clean"][idx], "adversarial": t["adversarial"][idx]}
    for m, v in t["maps_clean"].items():
        out[f"maps_clean.{m}"] = v[idx]
    for m, v in t["maps_adv"].items():
        out[f"maps_adv.{m}"] = v[idx]
    return out


def _fig_unpack(parts: list[dict[str, torch.Tensor]], methods: list[str]) -> dict[str, Any]:
    cat = lambda k: torch.cat([p[k] for p in parts])  # noqa: E731
    return {"labels": cat("labels"), "pred_adv": cat("pred_adv"), "r": cat("r"), "clean": cat("clean"),
            "adversarial": cat("adversarial"), "maps_clean": {m: cat(f"maps_clean.{m}") for m in methods},
            "maps_adv": {m: cat(f"maps_adv.{m}") for m in methods}}


# ---------------------------------------------------------------------------------------------
# One checkpoint
# ---------------------------------------------------------------------------------------------


def study_checkpoint(path: Path, x: torch.Tensor, y: torch.Tensor, ids: list[int], s: dict[str, Any], *, device: str,
                     class_names: list[str] | None, out_dir: Path, name: str | None = None, cache_dir: Path | None = None,
                     progress: WorkProgress | None = None,
                     publish: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the three parts on one checkpoint, batch by batch; writes its figure grid; returns the JSON-able result.

    Each batch of ``study.batch_size`` images runs the search and the maps, the faithfulness
    scores of its clean maps and the manipulation attack on its correct images (up to
    ``manipulation.num_images`` in all); each result is saved in ``cache_dir`` as it is done and
    read back on a rerun instead of being computed again (so a killed study loses at most one
    batch). After every computed batch ``publish`` gets the partial result.

    Args:
        path: checkpoint file.
        x: (N, C, H, W) test images in [0, 1]; y: (N,) labels; ids: (N,) dataset indices.
        s: :func:`_settings`.
        name: output name (default: the file's stem).
        cache_dir: folder of this checkpoint's cached batches (None: no cache).
        progress: the study's :class:`~jobs.progress.WorkProgress` (kinds of :func:`_work_per_image`).
        publish: called with the partial result after each computed batch.
    """
    from robustx.explain.study_figures import invalidation_grid

    name = name or path.stem
    wall0 = time.time()
    model, info = load_classifier(path)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    clock = _Clock(name)
    st, a, mo, man = s["study"], s["attack"], _map_options(s), s["manipulation"]
    boot, seed = int(st["bootstrap"]), int(st["seed"])
    methods = list(st["methods"])
    per_image = _work_per_image(s)
    n_total, bs = x.size(0), int(st["batch_size"])
    quota = _manip_quota(s, n_total)
    starts = list(range(0, n_total, bs))
    position = {int(i): j for j, i in enumerate(ids)}
    tag = _manip_tag(s)
    base = {k: progress.kinds[k].done if progress is not None and k in progress.kinds else 0.0 for k in per_image}

    records: list[dict] = []
    faith_per: dict[str, dict[str, list]] = {}
    man_rows: list[dict] = []
    man_info = {"layer": None, "num_images": 0, "num_correct": 0}
    fig_parts: list[dict[str, torch.Tensor]] = []
    stages: dict[str, float] = {}
    this_run: dict[str, float] = {}
    n_done = n_correct = resumed = 0
    done_ids: list[int] = []

    def add(into: dict[str, float], secs: dict[str, float]) -> None:
        for k, v in secs.items():
            into[k] = into.get(k, 0.0) + float(v)

    def result(partial: bool) -> dict[str, Any]:
        res: dict[str, Any] = {
            "checkpoint": str(path), "name": name, "format": info["format"], "partial": partial, "images_done": n_done,
            "num_images": n_total, "num_correct": n_correct, "accuracy": n_correct / max(1, n_done), "ids": list(done_ids),
        }
        res["invalidation"] = {"summary": summarize_invalidation(records, methods, bootstrap=boot, seed=seed), "records": records}
        if s["faithfulness"]["enabled"]:
            res["faithfulness"] = {"summary": _summarize_faithfulness(faith_per, boot, seed), "per_image": faith_per,
                                   "targets": "true class on the correctly classified clean images"}
        if man["enabled"]:
            res["manipulation"] = ({**man_info, "budgets": summarize_manipulation(man_rows, bootstrap=boot)} if man_rows
                                   else {"num_images": man_info["num_images"], "num_correct": man_info["num_correct"], "budgets": []})
        res["seconds"] = {
            "total": sum(stages.values()), "stages": dict(stages), "wall_this_run": time.time() - wall0,
            "compute_this_run": sum(this_run.values()), "batches": len(starts), "batches_resumed": resumed,
            "note": "total and stages: compute seconds summed over all batches, cached ones included (as measured when computed); "
                    "wall_this_run: this run's wall clock for this checkpoint, model loading included",
        }
        res["cache"] = None if cache_dir is None else str(cache_dir)
        return res

    for b, start in enumerate(starts):
        pos = list(range(start, min(start + bs, n_total)))
        bids = [int(ids[j]) for j in pos]
        where = f" [batch {b + 1}/{len(starts)}]"
        # --- invalidation (+ faithfulness) of the batch -------------------------------------------
        bpath = None if cache_dir is None else cache_dir / f"batch_{b:05d}.json"
        fpath = None if cache_dir is None else cache_dir / f"figures_{b:05d}.safetensors"
        needs = ("records", "num_correct", "seconds", "figure") + (("faithfulness",) if s["faithfulness"]["enabled"] else ())
        rec = _load_json(bpath, bids, needs)
        fig = None
        need_fig = int(s["figures"]["num_examples"]) - sum(int(p["ids"].numel()) for p in fig_parts)
        if rec is not None and int(rec["figure"]) > 0 and need_fig > 0:
            fig = _load_tensors(fpath, int(rec["figure"]))
            if fig is None:
                rec = None
        cached = rec is not None
        if cached:
            resumed += 1
        else:
            secs: dict[str, float] = {}
            clock.restart(secs, where)
            xb, yb = x[pos].to(device), y[pos].to(device)
            searched = [0]  # images the search runs on (the correct ones): known from its first step

            def on_search(n: int) -> None:
                searched[0] = n
                if progress is not None:
                    progress.advance(SEARCH, n)

            def on_stage(label: str) -> None:
                clock(f"invalidation: {label}")
                if progress is not None and label.startswith("maps "):
                    progress.advance(MAPS, searched[0] * _maps_per_method(s))

            res = invalidation_study(
                model, xb, yb, methods=methods, attack_steps=int(a["steps"]), attack_eps=float(a["eps"]),
                attack_momentum=float(a["momentum"]), attack_clip=bool(a["clip"]),
                autocast_dtype=torch.bfloat16 if a["bf16"] else None, frac=float(st["frac"]), map_options=mo,
                compare_original_class=bool(st["compare_original_class"]), noise_control=bool(st["noise_control"]),
                noise_seed=seed + start, ids=bids, bootstrap=0, keep_tensors=True, progress=on_stage,
                search_progress=on_search,
            )
            rec = {"ids": bids, "num_correct": int(res["num_correct"]), "records": res["records"], "figure": 0}
            t = res.get("tensors")
            if t is not None and s["faithfulness"]["enabled"]:
                xc, yc = t["clean"].to(device), t["labels"].to(device)
                adv = (lambda _name: progress.advance(FAITH, xc.size(0))) if progress is not None else None
                rec["faithfulness"] = _faithfulness(model, xc, yc, t["maps_clean"], s, on_map=adv)
                clock("faithfulness (deletion/insertion AUC)")
            elif s["faithfulness"]["enabled"]:
                rec["faithfulness"] = {}
            if t is not None and need_fig > 0:
                pick = [j for j, r in enumerate(res["records"]) if r["changed"]][:need_fig]
                if pick:
                    fig = _fig_pack(t, pick)
                    _save_tensors(fpath, fig)
                    rec["figure"] = len(pick)
            rec["seconds"] = secs
            _save_json(bpath, rec)
            add(this_run, secs)
        records += rec["records"]
        n_correct += int(rec["num_correct"])
        n_done += len(pos)
        done_ids += bids
        add(stages, rec["seconds"])
        for m, v in rec.get("faithfulness", {}).items():
            faith_per.setdefault(m, {"deletion": [], "insertion": []})
            faith_per[m]["deletion"] += v["deletion"]
            faith_per[m]["insertion"] += v["insertion"]
        if fig is not None and need_fig > 0:
            fig_parts.append({k: v[:need_fig] for k, v in fig.items()})
        if progress is not None:
            for k in (SEARCH, MAPS, FAITH):
                if k in per_image:
                    _settle(progress, k, base[k] + n_done * per_image[k])
        # --- manipulation of the batch's correct images (the first ``quota`` of the study) --------
        mids = [int(r["id"]) for r in rec["records"]][: max(0, quota - man_info["num_images"])]
        if man["enabled"] and mids:
            mpath = None if cache_dir is None else cache_dir / f"manipulation-{tag}_{b:05d}.json"
            mrec = _load_json(mpath, mids, ("rows", "layer", "num_correct", "seconds"))
            if mrec is None:
                cached = False
                secs = {}
                clock.restart(secs, where)
                mpos = [position[i] for i in mids]
                units = len(mids) * int(man["steps"])

                def on_attack(label: str) -> None:
                    clock(label)
                    if progress is not None:
                        progress.advance(MANIP, units)

                out = manipulation_attack(
                    model, x[mpos].to(device), y[mpos].to(device), layer=mo.get("layer"), budgets=[float(v) for v in man["budgets"]],
                    steps=int(man["steps"]), map_weight=float(man["map_weight"]), lr=float(man["lr"]), kappa=float(man["kappa"]),
                    clip=bool(man["clip"]), frac=float(st["frac"]), baseline=bool(man["baseline"]), ids=mids, bootstrap=0,
                    progress=on_attack,
                )
                rows = [{k: row[k] for k in ("budget", "variant", "map_weight", "per_image")} for row in out["budgets"]]
                mrec = {"ids": mids, "layer": out["layer"], "num_correct": out["num_correct"], "rows": rows, "seconds": secs}
                _save_json(mpath, mrec)
                add(this_run, secs)
            man_rows += mrec["rows"]
            man_info["layer"] = mrec["layer"]
            man_info["num_images"] += len(mids)
            man_info["num_correct"] += int(mrec["num_correct"])
            add(stages, mrec["seconds"])
        if progress is not None and MANIP in per_image:
            _settle(progress, MANIP, base[MANIP] + min(quota, n_done) * per_image[MANIP])
        if publish is not None and n_done < n_total and not cached:
            publish(result(partial=True))
        if progress is not None:
            left, unknown = progress.remaining_seconds()
            eta = f"about {format_duration(left)} left for the study" + (" (+ kinds of work not yet timed)" if unknown else "")
            log.info("%s: batch %d/%d done (%d/%d images, %d correct%s); %s", name, b + 1, len(starts), n_done, n_total, n_correct,
                     ", from the cache" if cached else "", eta)
    if resumed:
        log.info("%s: resumed %d of %d batches from %s", name, resumed, len(starts), cache_dir)
    # --- figure -------------------------------------------------------------------------------
    figs: dict[str, float] = {}
    clock.restart(figs)
    if fig_parts:
        parts = _fig_unpack(fig_parts, methods)
        invalidation_grid(
            out_dir / f"{name}_maps.png", clean=parts["clean"], adversarial=parts["adversarial"],
            maps_clean=parts["maps_clean"], maps_adv=parts["maps_adv"], labels=parts["labels"].tolist(),
            preds=parts["pred_adv"].tolist(), r=parts["r"].tolist(), class_names=class_names,
            title=f"{name}: clean map of the true class vs map of the new class after the minimal attack",
        )
        clock("figures")
        add(stages, figs)
        add(this_run, figs)
    return result(partial=False)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _fmt(stats: dict[str, Any] | None, digits: int = 3) -> str:
    if not stats or stats.get("n", 0) == 0 or stats["mean"] is None or math.isnan(stats["mean"]):
        return "n/a"
    ci = "" if math.isnan(stats["ci_low"]) else f" [{stats['ci_low']:.{digits}f}, {stats['ci_high']:.{digits}f}]"
    return f"{stats['mean']:.{digits}f}{ci}"


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


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


def _status(results: list[dict[str, Any]], pending: list[str]) -> str:
    """'' when every network is complete, else 'partial: a 20 of 50 images; b not started'."""
    parts = [f"{_name(r)} {r['images_done']} of {r['num_images']} images" for r in results if r.get("partial")]
    parts += [f"{n} not started" for n in pending]
    return "partial: " + "; ".join(parts) if parts else ""


def _name(r: dict[str, Any]) -> str:
    return r.get("name") or Path(r["checkpoint"]).stem


def write_tables(results: list[dict[str, Any]], out_dir: Path, settings: dict[str, Any], pending: list[str] = ()) -> dict[str, Path]:
    """invalidation/manipulation/faithfulness .md and .csv with the networks side by side -> {name: md path}.

    Networks are labelled by their output names (``name``, see :func:`output_stems`). While a
    study runs, results marked ``partial`` (and the ``pending`` networks not started yet) make
    each .md start with a "Partial results" line, label the partial networks' columns
    "name (partial k/N)" and fill the .csv's ``status`` column ("complete" when all are done).
    """
    status = _status(results, list(pending))
    nets = [f"{_name(r)} (partial {r['images_done']}/{r['num_images']})" if r.get("partial") else _name(r) for r in results]
    cnets = [_name(r) for r in results]
    note = (f"**Partial results** ({status}): the study is still running or was stopped; rerun the same command to resume "
            "from the cache.\n\n" if status else "")
    cstatus = status or "complete"
    frac = settings["study"]["frac"]
    written = {}
    stat_cols = ["mean", "ci_low", "ci_high", "median", "n"]
    # invalidation
    methods = settings["study"]["methods"]
    metrics = [k for k in INVALIDATION_METRICS if any(k in r["invalidation"]["summary"]["methods"][m] for r in results for m in methods)]
    md = [note + f"Minimal attack (paper search) flips the prediction y -> y'; M(image, class) is a method's map; top region = top {frac:.0%} of pixels. "
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
            csv_rows.append([m, k, *[_num((st or {}).get(c)) for st in stats for c in stat_cols], cstatus])
        md.append(_md_table(["method", *nets], rows))
    _write_text(out_dir / "invalidation.md", "\n".join(md))
    _write_csv(out_dir / "invalidation.csv", ["method", "metric", *[f"{n}_{c}" for n in cnets for c in stat_cols], "status"], csv_rows)
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
                    cells.append("n/a | n/a | n/a")
                    cells_csv += [""] * (2 + 3 * len(MANIPULATION_METRICS))
                    continue
                cells.append(f"{row['success_rate']:.2f} ({row['n']}) | {_fmt(row['spearman_new_class'])} | {_fmt(row['top_overlap_new_class'])}")
                cells_csv += [row["success_rate"], row["n"]]
                cells_csv += [_num(row[k][c]) for k in MANIPULATION_METRICS for c in ("mean", "ci_low", "ci_high")]
            md_rows.append([f"{key[0]:g}", key[1], *cells])
            csv_rows.append([key[0], key[1], *cells_csv, cstatus])
        sub = ["success rate (n)", "Grad-CAM Spearman, new class vs clean", "top-20% overlap"]
        header = ["RMSE budget", "attack", *[f"{n}: " + " | ".join(sub) for n in nets]]
        text = note + ("Flip the prediction inside an RMSE budget; map-preserving = also minimize 1 - cos(Grad-CAM of the new class on the "
                "manipulated image, clean Grad-CAM of the true class); plain = the same attack without the map term. "
                "Similarities are means [95% bootstrap CI] over the successful images.\n\n")
        # a markdown cell cannot hold '|': split into real columns
        header = ["RMSE budget", "attack"] + [f"{n}: {c}" for n in nets for c in sub]
        md_rows = [[r[0], r[1], *[c for cell in r[2:] for c in cell.split(" | ")]] for r in md_rows]
        _write_text(out_dir / "manipulation.md", text + _md_table(header, md_rows))
        _write_csv(out_dir / "manipulation.csv", ["budget", "variant", *[f"{n}_{c}" for n in cnets for c in (
            "success_rate", "n", *[f"{k}_{s}" for k in MANIPULATION_METRICS for s in ("mean", "ci_low", "ci_high")])], "status"],
            csv_rows)
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
            csv_rows.append([m, *cells_csv, cstatus])
        text = note + (f"Deletion / insertion AUC (Petsiuk et al. 2018) of each method's clean map of the true class on the correctly "
                f"classified images: {f['steps']} steps, deletion to '{f['deletion_baseline']}', insertion from '{f['insertion_baseline']}'. "
                "Deletion: lower is more faithful; insertion: higher. Means [95% bootstrap CI].\n\n")
        header = ["method", *[f"{n}: {k}" for n in nets for k in ("deletion AUC (lower better)", "insertion AUC (higher better)")]]
        _write_text(out_dir / "faithfulness.md", text + _md_table(header, md_rows))
        _write_csv(out_dir / "faithfulness.csv", ["method", *[f"{n}_{k}_{c}" for n in cnets for k in ("deletion", "insertion")
                                                              for c in ("mean", "ci_low", "ci_high", "n")], "status"], csv_rows)
        written["faithfulness"] = out_dir / "faithfulness.md"
    return written


def _write_json(path: Path, res: dict[str, Any]) -> None:
    _write_text(path, json.dumps(_json_safe(res), indent=1, allow_nan=False))


def run_study(cfg: DictConfig) -> list[dict[str, Any]]:
    """The study for every checkpoint in ``cfg.ckpt``; outputs go to the run directory (``paths.output_dir``).

    ``<name>.json`` and the tables are rewritten after every batch (marked partial until the end);
    with ``cache=true`` every batch's results are kept under ``<paths.log_dir>/study_cache/<key>/``
    (key: digest of the checkpoint's bytes, the settings and the data), so a rerun of a killed
    study skips what is done.
    """
    from robustx.explain.study_figures import manipulation_plot

    from jobs.evaluate import cache_key

    paths = checkpoint_paths(cfg.ckpt)
    names = output_stems(paths)
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
    pcfg = cfg.get("progress") or {}
    per_image = _work_per_image(settings)
    quota = _manip_quota(settings, len(ids))
    totals = {k: len(paths) * (quota if k == MANIP else len(ids)) * v for k, v in per_image.items()}
    progress = WorkProgress(totals, desc="study", unit="units", log=log, hint=_quick_hint(settings),
                            estimate_after=float(pcfg.get("estimate_after", 5.0)), long_seconds=float(pcfg.get("long_seconds", 300.0)),
                            enabled=bool(pcfg.get("bar", True)))
    log.info("work: %s for %d checkpoint(s); an estimate of the time follows once each kind of work has run a few seconds",
             ", ".join(f"{v:,} {k}" for k, v in totals.items()), len(paths))
    results: list[dict[str, Any]] = []
    try:
        for i, (p, name) in enumerate(zip(paths, names)):
            cache_dir = None
            if cfg.get("cache", True):
                cache_dir = Path(cfg.paths.log_dir) / "study_cache" / cache_key(p, _cache_settings(settings), data_info)
                log.info("%s: per-batch results cached in %s (a killed study resumes from there)", name, cache_dir)
            extra = {"settings": settings, "data": data_info, "versions": versions()}

            def publish(res: dict[str, Any], _name=name, _later=names[i + 1 :]) -> None:
                res.update(extra)
                _write_json(out_dir / f"{_name}.json", res)
                write_tables([*results, res], out_dir, settings, pending=list(_later))

            res = study_checkpoint(p, x, y, ids, settings, device=str(cfg.device), class_names=getattr(dm, "class_names", None),
                                   out_dir=out_dir, name=name, cache_dir=cache_dir, progress=progress, publish=publish)
            res.update(extra)
            _write_json(out_dir / f"{name}.json", res)
            summ = res["invalidation"]["summary"]
            sec = res["seconds"]
            log.info("%s: accuracy %.3f, %d of %d correct images flipped (median r %.4f); %.1f s of compute (%.1f s wall in this "
                     "run, %d of %d batches from the cache) -> %s", name, res["accuracy"], summ["n_changed"], summ["n_correct"],
                     summ["r"]["median"], sec["total"], sec["wall_this_run"], sec["batches_resumed"], sec["batches"],
                     out_dir / f"{name}.json")
            results.append(res)
            if i + 1 < len(paths):
                write_tables(results, out_dir, settings, pending=names[i + 1 :])
    finally:
        progress.close()
    written = write_tables(results, out_dir, settings)
    if all("manipulation" in r for r in results):
        manipulation_plot(out_dir / "manipulation.png", {_name(r): r["manipulation"]["budgets"] for r in results})
    log.info("tables: %s", ", ".join(str(v) for v in written.values()))
    return results
