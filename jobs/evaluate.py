"""eval.py's job: accuracy and ARAs of checkpoints on a fixed test subset, with JSON, PNG and a resumable cache."""

from __future__ import annotations

import hashlib
import json
import math
import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from robustx.robustness.ara import PROTOCOLS, ara_curve, evaluate_batch, summarize
from robustx.explain.figures import save_png
from robustx.io.files import atomic_write
from robustx.io.results import threat_label

from jobs.loading import checkpoint_paths, load_classifier, output_stems, versions

log = logging.getLogger(__name__)


def native_bf16(device: str) -> bool:
    """Whether ``device`` runs bf16 matrix work natively (CPU: AVX-512 BF16 or AMX; CUDA: Ampere+)."""
    if str(device).startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _auto_flag(value: Any, key: str, default: bool) -> bool:
    """``auto`` -> ``default``; booleans as given; anything else is a user error."""
    if isinstance(value, bool):
        return value
    if str(value).lower() == "auto":
        return default
    raise ValueError(f"ara.{key} must be true, false or auto, got {value!r}.")


def ara_settings(cfg: DictConfig) -> dict[str, Any]:
    a = cfg.ara
    if a.protocol not in PROTOCOLS:
        raise ValueError(f"unknown ara.protocol '{a.protocol}'; choose one of {sorted(PROTOCOLS)}.")
    s = dict(PROTOCOLS[a.protocol])
    for k in ("steps", "eps", "momentum", "refine"):
        if a.get(k) is not None:
            s[k] = a[k]
    for k in ("steps", "eps", "momentum", "refine"):
        v = s.get(k, 0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"ara.{k} must be a finite number, got {v!r}.")
    if s["steps"] <= 0 or s["eps"] <= 0:
        raise ValueError(f"ara.steps and ara.eps must be > 0, got {s['steps']} and {s['eps']}.")
    if s["steps"] != int(s["steps"]) or s.get("refine", 0) != int(s.get("refine", 0)) or s.get("refine", 0) < 0:
        raise ValueError(f"ara.steps and ara.refine must be whole numbers (refine >= 0), got {s['steps']} and {s.get('refine', 0)}.")
    if not 0 <= s["momentum"] < 1:
        raise ValueError(f"ara.momentum must be in [0, 1), got {s['momentum']}.")
    for k in ("num_images", "batch_size"):
        if not isinstance(a.get(k), int) or isinstance(a.get(k), bool) or a[k] <= 0:
            raise ValueError(f"ara.{k} must be a whole number > 0, got {a.get(k)!r}.")
    # "auto": the measured fast path (bf16 autocast + channels_last + torch.compile; BENCHMARKS.md
    # "Search speed") where the device runs bf16 natively, else the eager fp32 path.
    fast = native_bf16(str(cfg.get("device", "cpu")))
    modes = list(a.modes)
    if any(m not in ("attack", "btr") for m in modes) or not modes:
        raise ValueError(f"ara.modes must be a non-empty subset of [attack, btr], got {modes}.")
    return {**s, "protocol": a.protocol, "num_images": int(a.num_images), "batch_size": int(a.batch_size), "modes": modes,
            "clip": bool(a.clip), "bf16": _auto_flag(a.bf16, "bf16", fast),
            "channels_last": _auto_flag(a.channels_last, "channels_last", fast),
            "compile": _auto_flag(a.get("compile", False), "compile", fast),
            "fast_attacks": _fast_attacks(cfg.get("fast_attacks", False))}


def _fast_attacks(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"fast_attacks must be true or false, got {value!r}.")
    return value


def cross_check_attacks(node: Any) -> dict[str, int]:
    """The ``cross_check`` config (preset, or an explicit attack list, and steps) -> {attack: steps}."""
    from robustx.robustness.crosscheck import resolve_attacks

    c = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    attacks = c.get("attacks")
    return resolve_attacks(preset=c.get("preset", "quick"), attacks=None if attacks is None else list(attacks), steps=c.get("steps"))


def fixed_radius_settings(node: Any, default_threat_models: list[dict]) -> dict | None:
    """The ``fixed_radius`` config -> {version, threat_models, n_queries, seed}, or None for ``version: none``."""
    from robustx.robustness.fixed_radius import VERSIONS, check_threat_model

    c = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    version = str(c.get("version", "quick"))
    if version not in (*VERSIONS, "none"):
        raise ValueError(f"fixed_radius.version must be one of {sorted(VERSIONS)} or none, got '{version}'.")
    tms = c.get("threat_models")
    tms = [dict(t) for t in (default_threat_models if tms is None else tms)]
    for t in tms:
        if set(t) != {"norm", "eps"}:
            raise ValueError(f"fixed_radius.threat_models entries are {{norm: L2|Linf, eps: radius}}, got {t}.")
        check_threat_model(t["norm"], t["eps"], "quick" if version == "none" else version)
    n_queries = int(c.get("n_queries", 5000))
    if n_queries <= 0:
        raise ValueError(f"fixed_radius.n_queries must be > 0, got {n_queries}.")
    if version == "none":
        return None
    return {"version": version, "threat_models": tms, "n_queries": n_queries, "seed": int(c.get("seed", 0))}


def _file_digest(path: Path) -> str:
    """sha256 of a file's bytes: the cache follows the weights, not the file's mtime or location."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(path: Path, settings: dict, data: dict) -> str:
    # Content, not mtime: copying a checkpoint or restarting a machine that remounts its
    # folder must not throw away hours of cached search.
    h = hashlib.sha1(json.dumps([_file_digest(path), settings, data], sort_keys=True).encode())
    return h.hexdigest()[:16]


def _record_digest(rec: dict) -> str:
    """sha256 of a cache record's content (without its own digest field)."""
    body = {k: v for k, v in rec.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _load_cached(path: Path | None, *, ids: list[int] | None = None, keys: tuple[str, ...] = ()) -> dict | None:
    """A cache record if it is intact: its checksum matches, each of ``keys`` holds one value per image of
    ``ids`` (and its "ids", where it has them, are ``ids``); else None.

    A record that was edited, truncated or written by something else is recomputed (with a
    warning), never used: a scaled r_i would silently change the ARA.
    """
    if path is None or not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        rec = None
    ok = isinstance(rec, dict) and rec.get("sha256") == _record_digest(rec) and all(
        isinstance(rec.get(k), list) and (ids is None or len(rec[k]) == len(ids)) for k in keys) and (
        ids is None or rec.get("ids", ids) == ids)
    if not ok:
        log.warning("ignoring corrupt or edited cache file %s (recomputing it)", path)
        return None
    return rec


def _dist() -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1); joins the process group on first use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


class _CountForwards(torch.nn.Module):
    """``model`` that reports the batch size of every forward pass (an attack's image-steps, for the progress bar)."""

    def __init__(self, model: torch.nn.Module, on_forward) -> None:
        super().__init__()
        self.model, self.on_forward = model, on_forward
        self.count = 0  # images forwarded
        self.train(model.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += x.size(0)
        self.on_forward(x.size(0))
        return self.model(x)


def evaluate_checkpoint(path: Path, dataset, ids: list[int], settings: dict, *, num_classes: int, cache_dir: Path | None,
                        bootstrap: int, device: str, cross_check: dict[str, int] | None = None,
                        fixed_radius: dict | None = None, name: str | None = None) -> dict[str, Any] | None:
    """Run the minimal-perturbation search on ``dataset[ids]``; results are cached per batch and criterion for resume.

    Under torchrun, rank k computes batches k, k + W, ...; the cache folder is where the ranks
    meet: after a barrier rank 0 reads every batch back and summarizes (other ranks return None).
    Progress is counted in image-steps (search steps and cross-check attack steps) with an ETA
    per stage, and a one-line estimate of the time left is logged once each stage has been timed.

    ``cross_check`` maps minimal-norm attacks to their steps (crosscheck.resolve_attacks);
    ``fixed_radius`` is ``{"version", "threat_models": [{"norm", "eps"}], "n_queries", "seed"}``
    (None or no threat models: no fixed-radius evaluation).
    """
    from robustx.robustness.crosscheck import ATTACKS, independent_minimal_perturbation
    from robustx.compiled import FastForward, retain_graph_allowed
    from robustx.robustness.fixed_radius import VERSIONS, check_threat_model, fixed_radius_attack
    from robustx.utils import frozen_parameters

    from jobs.progress import WorkProgress

    name = name or path.stem
    rank, world = _dist()
    if device == "cuda" and world > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"  # one GPU per torchrun process
    if device.startswith("cuda") and not settings["bf16"]:
        # The full-precision path means fp32: cuDNN's default TF32 convolutions would not be.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model, info = load_classifier(path)
    model.to(device)
    if settings["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    start = time.time()
    batches = [ids[i : i + settings["batch_size"]] for i in range(0, len(ids), settings["batch_size"])]
    if world > 1 and cache_dir is None:
        raise ValueError("eval.py under torchrun needs cache=true: the cache folder is how ranks share results.")
    resumed = units_resumed = 0
    mine = [b for b in range(len(batches)) if b % world == rank]
    modes = list(settings["modes"])
    attacks = list(cross_check or {})
    for n in attacks:
        if n not in ATTACKS:
            raise ValueError(f"unknown cross_check attack '{n}'; choose from {sorted(ATTACKS)} or [] for none.")
    fr = dict(fixed_radius or {})
    threat_models = [dict(t) for t in fr.get("threat_models") or []]
    for t in threat_models:
        check_threat_model(t["norm"], float(t["eps"]), fr.get("version", "standard"))
    # One unit per threat model; its name carries every setting its verdicts depend on.
    fr_units = {f"fr_{t['norm']}_{float(t['eps']):.6g}_{fr['version']}_s{int(fr.get('seed', 0))}_q{int(fr.get('n_queries', 5000))}": t
                for t in threat_models}
    # Budget per image (an upper bound: each attack runs only on images still robust).
    fr_budget = {"apgd-ce": 100, "apgd-t": 900, "fab-t": 900, "square": int(fr.get("n_queries", 5000))}
    steps_of = {**{m: int(settings["steps"]) for m in modes}, **{n: int(cross_check[n]) for n in attacks},
                **{u: sum(fr_budget[a] for a in VERSIONS[fr["version"]]) for u in fr_units}}
    kind = {**{m: f"{settings['protocol']} search ({m})" for m in modes}, **{n: f"cross-check {n}" for n in attacks},
            **{u: f"fixed radius {t['norm']} {float(t['eps']):.4g} ({fr['version']})" for u, t in fr_units.items()}}
    units = [*modes, *attacks, *fr_units]

    # With fast_attacks=true the attacks (AutoAttack's, adv-lib's) run on the search's fast path
    # (bf16 autocast, channels_last, compiled, as ara.bf16/channels_last/compile choose); what they find is re-checked in fp32
    # on the model itself (fixed_radius / crosscheck). Measured against fp32 attacks run one after
    # another: bench/bench_eval_speed.py, docs/evaluation.md "Speed".
    fast_attacks = bool(settings.get("fast_attacks")) and (settings["bf16"] or settings["compile"])
    fast_model = FastForward(model, bf16=settings["bf16"], channels_last=settings["channels_last"],
                             compile=settings["compile"]) if fast_attacks else None

    def attack_models(on_forward) -> tuple[_CountForwards, _CountForwards | None]:
        """(the fp32 model for re-checks, the model the attacks run on or None), both counting forwards."""
        return _CountForwards(model, on_forward), (_CountForwards(fast_model, on_forward) if fast_model is not None else None)

    def forwards(*counted: _CountForwards | None) -> int:
        return sum(c.count for c in counted if c is not None)

    def save(path: Path | None, rec: dict) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps({**rec, "sha256": _record_digest(rec)}))

    # One cache file per (batch, criterion) of the paper search and per (batch, attack) of the
    # cross-check: a killed run loses at most one of them, and adding a cross-check later reuses
    # the (expensive) search results.
    def unit_path(b: int, unit: str) -> Path | None:
        if cache_dir is None:
            return None
        if unit in modes:
            return cache_dir / f"batch_{b:05d}_{unit}.json"
        if unit in fr_units:
            return cache_dir / f"{unit}_batch_{b:05d}.json"
        return cache_dir / f"{unit}-{steps_of[unit]}_batch_{b:05d}.json"

    def unit_keys(unit: str) -> tuple[str, ...]:
        if unit in modes:
            return ("ids", "correct", *(f"{k}_{unit}" for k in ("r", "found", "rechecked", "first_fail_step")))
        if unit in fr_units:
            return (f"robust_{unit}", f"broken_by_{unit}", f"correct_{unit}")
        return (f"r_{unit}",)

    n_mine = sum(len(batches[b]) for b in mine)
    quick = [f"ara.num_images={max(10, len(ids) // 10)}"] + (["ara.protocol=fast"] if settings["protocol"] == "paper" else [])
    hint = f"For a quick look: {' or '.join(quick)}" + (", cross_check.attacks=[] skips the cross-check" if attacks else "")
    log.info("%s: %d images x (%s) = %s image-steps to compute%s", name, n_mine,
             " + ".join(f"{steps_of[u]} {kind[u]}" for u in units),
             f"{n_mine * sum(steps_of.values()):,}", f" [rank {rank} of {world}]" if world > 1 else "")
    prog = WorkProgress({kind[u]: n_mine * steps_of[u] for u in units},
                        desc=f"ARA {name}" + (f" [rank {rank}]" if world > 1 else ""), unit="image-step", log=log, hint=hint)
    results: list[dict] = []
    try:
        for b in mine:
            chunk = batches[b]
            recs = {u: _load_cached(unit_path(b, u), ids=chunk, keys=unit_keys(u)) for u in units}
            todo = [u for u, r in recs.items() if r is None]
            units_resumed += len(recs) - len(todo)
            for u in recs:
                if u not in todo:
                    prog.skip(kind[u], len(chunk) * steps_of[u])
            if not todo:
                resumed += 1
            else:
                x = torch.stack([dataset[j][0] for j in chunk]).to(device)
                y = torch.tensor([int(dataset[j][1]) for j in chunk], device=device)
                if settings["channels_last"]:
                    x = x.contiguous(memory_format=torch.channels_last)
            for u in todo:
                t0, k = time.time(), kind[u]
                upto = prog.kinds[k].done + len(chunk) * steps_of[u]
                if u in modes:
                    out = evaluate_batch(model, x, y, modes=(u,), steps=settings["steps"], eps=settings["eps"],
                                         momentum=settings["momentum"], clip=settings["clip"],
                                         autocast_dtype=torch.bfloat16 if settings["bf16"] else None,
                                         refine=int(settings.get("refine", 0)), compile=settings["compile"],
                                         progress=lambda m, n, k=k, upto=upto: prog.advance(k, n, upto=upto))
                    rec = {key: v.cpu().tolist() for key, v in out.items()}
                    rec.update(ids=chunk, seconds=time.time() - t0)
                elif u in fr_units:
                    counted, counted_fast = attack_models(lambda n, k=k, upto=upto: prog.advance(k, n, upto=upto))
                    t = fr_units[u]
                    with frozen_parameters(model), retain_graph_allowed():  # FAB backpropagates one graph per class
                        res_fr = fixed_radius_attack(counted, x.contiguous(), y, norm=t["norm"], eps=float(t["eps"]), version=fr["version"],
                                                     num_classes=num_classes, seed=int(fr.get("seed", 0)),
                                                     n_queries=int(fr.get("n_queries", 5000)), attack_model=counted_fast)
                    rec = {f"robust_{u}": res_fr["robust"].tolist(), f"correct_{u}": res_fr["correct"].tolist(),
                           f"broken_by_{u}": res_fr["broken_by"], f"robust_after_{u}": res_fr["robust_after"],
                           f"attacked_{u}": res_fr["attacked"], f"rerun_fp32_{u}": res_fr["rerun_fp32"],
                           f"stretched_fp32_{u}": res_fr["stretched_fp32"], f"refined_fp32_{u}": res_fr["refined_fp32"],
                           f"forwards_{u}": forwards(counted, counted_fast), f"seconds_{u}": time.time() - t0}
                else:
                    counted, counted_fast = attack_models(lambda n, k=k, upto=upto: prog.advance(k, n, upto=upto))
                    with frozen_parameters(model), retain_graph_allowed():
                        r_ind, _ = independent_minimal_perturbation(counted, x.contiguous(), y, attack=u, steps=steps_of[u],
                                                                    attack_model=counted_fast)
                    rec = {f"r_{u}": r_ind.cpu().tolist(), f"seconds_{u}": time.time() - t0,
                           f"forwards_{u}": forwards(counted, counted_fast)}
                # Images failing unperturbed are not searched: the batch's count ends exact here.
                prog.finish(k, upto)
                save(unit_path(b, u), rec)
                recs[u] = rec
            if cache_dir is None:  # no cache: keep results in memory
                results.append(_merge(recs, modes))
    finally:
        prog.close()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if rank != 0:
            return None
    if cache_dir is not None:
        results = []
        for b in range(len(batches)):
            recs = {u: _load_cached(unit_path(b, u), ids=batches[b], keys=unit_keys(u)) for u in units}
            missing = [u for u, r in recs.items() if r is None]
            if missing:
                raise RuntimeError(f"cached batch {b} ({', '.join(missing)}) is missing after evaluation (cache {cache_dir}); "
                                   "rerun to resume.")
            results.append(_merge(recs, modes))
    if units_resumed:
        log.info("%s: resumed %d of %d batches from %s (%d of %d batch x criterion/attack units)", path.name, resumed,
                 len(batches), cache_dir, units_resumed, len(mine) * len(units))
    wall = time.time() - start
    # Compute time of every stage, summed over batches whether computed now or resumed from the
    # cache, so a resumed evaluation still reports what the measurement cost.
    untimed = sum(1 for r in results if "seconds" not in r)
    by_stage = {"search": sum(float(r.get("seconds", 0.0)) for r in results),
                **{n: sum(float(r.get(f"seconds_{n}", 0.0)) for r in results) for n in [*attacks, *fr_units]}}
    cat = lambda k: [v for r in results for v in r[k]]  # noqa: E731
    correct = cat("correct")
    out: dict[str, Any] = {
        "checkpoint": str(path), "name": name, "format": info["format"], "model_config": info.get("model_config"),
        "num_images": len(ids), "accuracy": sum(correct) / len(correct), "ids": cat("ids"), "correct": [bool(c) for c in correct],
        "seconds": sum(by_stage.values()), "seconds_by_stage": by_stage, "wall_seconds_this_run": wall,
        "batches_resumed": resumed, "batches_without_timing": untimed,
    }
    warnings = []
    from robustx.robustness.flags import model_checks, raised_lines

    first = ids[: settings["batch_size"]]
    flags: dict[str, dict] = model_checks(model, torch.stack([dataset[j][0] for j in first]).to(device),
                                          torch.tensor([int(dataset[j][1]) for j in first], device=device))
    for mode in settings["modes"]:
        r = torch.tensor(cat(f"r_{mode}"), dtype=torch.float64)
        summ = summarize(r, num_classes, bootstrap=bootstrap)
        rel = abs(summ["ara_binned"] - summ["ara"]) / max(summ["ara"], 1e-12)
        not_found = len(r) - sum(cat(f"found_{mode}"))
        late = sum(1 for s, f in zip(cat(f"first_fail_step_{mode}"), cat(f"found_{mode}")) if not f or s > settings["steps"] // 2)
        not_rechecked = sum(1 for f, c in zip(cat(f"found_{mode}"), cat(f"rechecked_{mode}")) if f and not c)
        if late:
            warnings.append(f"{mode}: {late} image(s) did not fail within {settings['steps'] // 2} steps (T/2); the bound is not representative.")
        if not_rechecked:
            warnings.append(f"{mode}: {not_rechecked} reported perturbation(s) no longer fail in a full-precision re-check.")
        out[mode] = {**summ, "binned_vs_exact_rel_diff": rel, "not_found": not_found, "late": late,
                     "not_rechecked": not_rechecked, "r": r.tolist()}
    names = attacks
    r_box: torch.Tensor | None = None  # per-image minimum over the in-box (adv-lib) attacks
    if names and "attack" in settings["modes"]:
        from robustx.robustness.crosscheck import ensemble_r, masking_report, optimality

        r_paper = torch.tensor(cat("r_attack"), dtype=torch.float64)
        indep = {n: torch.tensor(cat(f"r_{n}"), dtype=torch.float64) for n in names}
        r_ens = ensemble_r(r_paper, *indep.values())
        r_box = ensemble_r(*indep.values())
        every = {"paper": r_paper, **indep}
        opt = {n: optimality(r_i, r_ens) for n, r_i in every.items()}
        strongest = max(opt, key=opt.get)
        out["ensemble"] = {**summarize(r_ens, num_classes, bootstrap=bootstrap), "attacks": ["paper", *names], "r": r_ens.tolist(),
                           "optimality": opt, "strongest": strongest,
                           "best_share": {n: float((every[n] <= r_ens * (1 + 1e-9)).double().mean()) for n in every}}
        out["cross_check"] = {}
        for n, r_i in indep.items():
            finite = torch.isfinite(r_i)
            rep = masking_report(r_paper, r_i)
            out["cross_check"][n] = {
                **rep,
                "failed": int((~finite).sum()),
                "steps": steps_of[n],
                "ara_attack": summarize(r_i.masked_fill(~finite, float(r_paper.max())), num_classes, bootstrap=0)["ara"],
                "optimality": opt[n],
                "seconds": sum(r.get(f"seconds_{n}", 0.0) for r in results),
                "forwards": sum(int(r.get(f"forwards_{n}", 0)) for r in results),
                "r": [x if math.isfinite(x) else None for x in r_i.tolist()],
            }
            flags[f"search_vs_{n}"] = {"raised": bool(rep["warn"]), "value": rep["share_much_smaller"], "message":
                                       f"GRADIENT MASKING SIGNAL: {n} found perturbations under half the paper search's on "
                                       f"{100 * rep['share_much_smaller']:.1f}% of images; trust the ensemble ARA, not the paper-protocol one"}
    if fr_units:
        from robustx.robustness.fixed_radius import rmse_of_radius
        from robustx.robustness.flags import contradiction_flags, square_flag

        num_pixels = int(dataset[ids[0]][0].numel())
        out["fixed_radius"] = []
        for u, t in fr_units.items():
            robust = torch.tensor(cat(f"robust_{u}"), dtype=torch.bool)
            correct_fr = torch.tensor(cat(f"correct_{u}"), dtype=torch.bool)
            broken = cat(f"broken_by_{u}")
            order = VERSIONS[fr["version"]]
            after = {a: sum(int(r[f"robust_after_{u}"][a]) for r in results) for a in order
                     if all(a in r[f"robust_after_{u}"] for r in results)}  # (APGD-T is left out below 4 classes)
            eps_rmse = rmse_of_radius(t["norm"], float(t["eps"]), num_pixels)
            label = f"{t['norm']} {float(t['eps']):.4g}"
            entry = {"norm": t["norm"], "eps": float(t["eps"]), "eps_rmse": eps_rmse, "eps_rmse_is_bound": t["norm"] == "Linf",
                     "version": fr["version"], "attacks": list(order), "seed": int(fr.get("seed", 0)),
                     "n_queries": int(fr.get("n_queries", 5000)), "clean_accuracy": float(correct_fr.double().mean()),
                     "robust_accuracy": float(robust.double().mean()),
                     "robust_accuracy_after": {a: n / len(ids) for a, n in after.items()},
                     "broken_by": {a: broken.count(a) for a in order},
                     # images whose bf16 example fooled only the fast model: stretched or refined into an fp32 one, or attacked again in fp32
                     **{key: {a: sum(int((r.get(f"{key}_{u}") or {}).get(a, 0)) for r in results) for a in order}
                        for key in ("stretched_fp32", "refined_fp32", "rerun_fp32")},
                     "forwards": sum(int(r.get(f"forwards_{u}", 0)) for r in results),
                     "seconds": sum(float(r.get(f"seconds_{u}", 0.0)) for r in results),
                     "robust": robust.tolist()}
            flags[f"square_{label.replace(' ', '_')}"] = square_flag(after, num_images=len(ids))
            if r_box is not None and t["norm"] == "L2":
                entry["minimal_norm_robust_accuracy"] = float((correct_fr & (r_box > eps_rmse)).double().mean())
                for k, v in contradiction_flags(robust, correct_fr, r_box, eps_rmse=eps_rmse, label=label).items():
                    flags[f"{k}_{label.replace(' ', '_')}"] = v
            out["fixed_radius"].append(entry)
    out["flags"] = flags
    warnings += [f"FLAG {line}" for line in raised_lines(flags)]
    out["warnings"] = warnings
    for w in warnings:
        log.warning("%s: %s", path.name, w)
    return out


def _merge(recs: dict[str, dict], modes: list[str]) -> dict[str, Any]:
    """One batch's cache records (one per criterion and attack) -> one record; "seconds" sums the criteria's."""
    out: dict[str, Any] = {}
    for u, rec in recs.items():
        out.update({k: v for k, v in rec.items() if k != "seconds"})
    timed = [recs[m]["seconds"] for m in modes if "seconds" in recs[m]]
    if len(timed) == len(modes):
        out["seconds"] = sum(timed)
    return out


def write_result_files(res: dict[str, Any], out_dir: Path, stem: str, ckpt: Path) -> list[Path]:
    """The files other tools read: per-image CSV, RobustBench-style entries, a model card beside the safetensors weights."""
    from robustx.io.export import save_model
    from robustx.io.results import model_card, write_per_image_csv, write_robustbench

    written = [write_per_image_csv(res, out_dir / f"{stem}_per_image.csv")]
    written += write_robustbench(res, out_dir / "robustbench", name=stem)
    card = out_dir / f"{stem}_card"
    card.mkdir(parents=True, exist_ok=True)
    model, info = load_classifier(ckpt)
    if info.get("model_config"):
        save_model(model, card / "model.safetensors", model_config=info["model_config"], metadata={"source": str(ckpt)})
    atomic_write(card / "README.md", model_card(res, name=stem))
    return [*written, card / "README.md"]


def plot_curves(results: list[dict[str, Any]], png: Path, modes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if all("ensemble" in r for r in results):
        modes = [*modes, "ensemble"]
    protocol = results[0].get("settings", {}).get("protocol", "paper")
    titles = {"attack": f"Attack ({protocol} search)", "btr": f"BTR ({protocol} search)",
              "ensemble": f"Attack (ensemble: {protocol} search + adv-lib)"}
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for res in results:
            radii, acc = ara_curve(torch.tensor(res[mode]["r"]))
            ax.step(radii.numpy(), acc.numpy(), where="post", label=f"{res.get('name', Path(res['checkpoint']).stem)} (ARA {res[mode]['ara']:.4f})")
        ax.axhline(1.0 / res["num_classes"], color="gray", ls=":", lw=1, label="chance")
        # symlog keeps r = 0 (images already failing) on the axis; r is never negative.
        ax.set_xscale("symlog", linthresh=1e-4, linscale=0.3)
        ax.set_xlim(left=0)
        ax.set_xlabel("perturbation RMSE r")
        ax.set_ylabel("fraction of images with r_i > r")
        ax.set_title(titles[mode])
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, png, dpi=120, close=True)


def evaluate(cfg: DictConfig) -> list[dict[str, Any]]:
    paths = checkpoint_paths(cfg.ckpt)
    settings = ara_settings(cfg)
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device} but CUDA is not available here; use device=cpu.")
    if cfg.ara.get("threads"):
        torch.set_num_threads(int(cfg.ara.threads))
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg["limit_test"] = settings["num_images"]
    dm = hydra.utils.instantiate(data_cfg, _convert_="all")
    dm.prepare_data()
    dm.setup("test")
    ds = dm.test_set
    ids = list(range(len(ds)))
    if not ids:
        raise ValueError("the test subset is empty; set ara.num_images to a positive number of images.")
    cross = cross_check_attacks(cfg.get("cross_check") or {"attacks": []})
    fixed = fixed_radius_settings(cfg.get("fixed_radius") or {"version": "none"}, getattr(dm, "threat_models", []))
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for p, stem in zip(paths, output_stems(paths)):
        key = cache_key(p, settings, {k: data_cfg.get(k) for k in ("_target_", "root", "limit_test", "val_seed")})
        cache_dir = Path(cfg.paths.log_dir) / "eval_cache" / key if cfg.get("cache") else None
        if cache_dir is not None:
            log.info("%s: per-batch results cached in %s (a killed run resumes from there)", stem, cache_dir)
        res = evaluate_checkpoint(p, ds, ids, settings, num_classes=int(dm.num_classes), cache_dir=cache_dir,
                                  bootstrap=int(cfg.ara.bootstrap), device=str(cfg.device), cross_check=cross,
                                  fixed_radius=fixed, name=stem)
        if res is None:  # a non-zero torchrun rank: rank 0 writes the outputs
            continue
        res.update({"settings": settings, "data": {k: data_cfg.get(k) for k in ("_target_", "root", "limit_test", "val_seed")},
                    "num_classes": int(dm.num_classes), "versions": versions(str(cfg.device))})
        atomic_write(out_dir / f"{stem}.json", json.dumps(res, indent=1))
        plot_curves([res], out_dir / f"{stem}.png", settings["modes"])
        line = ", ".join(
            f"{m} ARA {res[m]['ara']:.5f} [{res[m]['ara_ci_low']:.5f}, {res[m]['ara_ci_high']:.5f}]" for m in settings["modes"]
        )
        if "ensemble" in res:
            e = res["ensemble"]
            line += (f", ensemble attack ARA {e['ara']:.5f} (strongest: {e['strongest']}; optimality "
                     + ", ".join(f"{n} {v:.3f}" for n, v in e["optimality"].items()) + ")")
        for entry in res.get("fixed_radius") or []:
            line += (f", robust accuracy {entry['robust_accuracy']:.4f} at {threat_label(entry)} (RMSE {entry['eps_rmse']:.4g}, "
                     f"AutoAttack {entry['version']})")
        written = write_result_files(res, out_dir, stem, p)
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in res["seconds_by_stage"].items())
        log.info("%s: accuracy %.4f, %s; %.1f s of compute (%s; %.1f s in this run) -> %s", stem, res["accuracy"], line,
                 res["seconds"], stages, res["wall_seconds_this_run"], out_dir / f"{stem}.json")
        log.info("%s: also %s", stem, ", ".join(str(w) for w in written))
        results.append(res)
    if _dist()[1] > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if len(results) > 1:
        plot_curves(results, out_dir / "curves.png", settings["modes"])
        log.info("all curves: %s", out_dir / "curves.png")
    return results
