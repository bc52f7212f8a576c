"""Result files other tools read: a per-image CSV, RobustBench-style entries and a Hugging Face model card.

All are written from the evaluation's result dict (what eval.py writes as JSON), so they hold the
same numbers; nothing is uploaded anywhere.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from robustx.io.files import atomic_write

__all__ = ["per_image_rows", "write_per_image_csv", "robustbench_entries", "write_robustbench", "model_card", "threat_label"]

_DATASETS = {"CIFAR10DataModule": ("cifar10", "CIFAR-10"), "FashionMNISTDataModule": ("fashion_mnist", "Fashion-MNIST"),
             "ImageNetDataModule": ("imagenet", "ImageNet"), "ImageFolderDataModule": ("imagefolder", "ImageFolder")}


def _dataset(res: dict[str, Any]) -> tuple[str, str]:
    target = str((res.get("data") or {}).get("_target_", "")).rsplit(".", 1)[-1]
    return _DATASETS.get(target, (target.lower() or "unknown", target or "unknown"))


def threat_label(entry: dict[str, Any]) -> str:
    """``L2 eps=0.5`` style name of a fixed-radius entry."""
    return f"{entry['norm']} eps={entry['eps']:.6g}"


def _num(x: Any) -> Any:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def per_image_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluated image: its id, r_i of each search/attack and of the ensemble, fixed-radius verdicts."""
    n = len(res["ids"])
    cols: dict[str, list] = {"id": res["ids"]}
    for mode in ("attack", "btr"):
        if mode in res:
            cols[f"r_{mode}"] = res[mode]["r"]
    for name, cc in (res.get("cross_check") or {}).items():
        cols[f"r_{name}"] = cc["r"]
    if "ensemble" in res:
        cols["r_ensemble"] = res["ensemble"]["r"]
    for entry in res.get("fixed_radius") or []:
        key = f"{entry['norm']}_{entry['eps']:.6g}"
        cols[f"robust_{key}"] = [int(b) for b in entry["robust"]]
    correct = [int(bool(c)) for c in res["correct"]]
    rows = []
    for i in range(n):
        row = {"id": cols["id"][i], "correct": correct[i]}
        row.update({k: _num(v[i]) for k, v in cols.items() if k != "id"})
        rows.append(row)
    return rows


def write_per_image_csv(res: dict[str, Any], path: str | Path) -> Path:
    """The per-image CSV (atomic). Empty cells: the attack found no perturbation."""
    rows = per_image_rows(res)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["id"])
    writer.writeheader()
    writer.writerows(rows)
    path = Path(path)
    atomic_write(path, buf.getvalue())
    return path


def robustbench_entries(res: dict[str, Any], *, name: str | None = None) -> list[dict[str, Any]]:
    """One RobustBench ``model_info``-style entry per fixed-radius threat model (accuracies in percent, as strings).

    ``number_forward_passes`` is RobustBench's field (model passes per prediction: 1 for a
    deterministic network); the attack's cost is ``attack_forward_passes``. The ARAs are added
    beside RobustBench's fields.
    """
    dataset, _ = _dataset(res)
    out = []
    for entry in res.get("fixed_radius") or []:
        item = {
            "name": name or res.get("name"),
            "dataset": dataset,
            "threat_model": entry["norm"],
            "eps": f"{entry['eps']:.6g}",
            "eps_rmse": entry["eps_rmse"],
            "clean_acc": f"{100 * entry['clean_accuracy']:.2f}",
            "autoattack_acc": f"{100 * entry['robust_accuracy']:.2f}",
            "autoattack_version": entry["version"],
            "additional_data": False,
            "number_forward_passes": 1,
            "attack_forward_passes": entry["forwards"],
            "num_images": res["num_images"],
            "ara_attack": res.get("attack", {}).get("ara"),
            "ara_btr": res.get("btr", {}).get("ara"),
            "ara_ensemble": res.get("ensemble", {}).get("ara"),
            "unreliable": bool(any(v.get("raised") for v in (res.get("flags") or {}).values())),
        }
        out.append(item)
    return out


def write_robustbench(res: dict[str, Any], out_dir: str | Path, *, name: str) -> list[Path]:
    """Write the entries as ``<out_dir>/<dataset>/<L2|Linf>/<name>.json`` (RobustBench's model_info layout)."""
    paths = []
    for item in robustbench_entries(res, name=name):
        p = Path(out_dir) / item["dataset"] / item["threat_model"] / f"{name}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, json.dumps(item, indent=1))
        paths.append(p)
    return paths


def model_card(res: dict[str, Any], *, name: str, weights: str = "model.safetensors") -> str:
    """A Hugging Face model card (README.md) whose ``model-index`` YAML block holds the evaluation's numbers."""
    import yaml

    dataset, pretty = _dataset(res)
    metrics = [{"type": "accuracy", "value": round(float(res["accuracy"]), 6), "name": "Clean accuracy"}]
    for entry in res.get("fixed_radius") or []:
        metrics.append({"type": "robust_accuracy", "value": round(float(entry["robust_accuracy"]), 6),
                        "name": f"Robust accuracy, AutoAttack ({entry['version']}) {threat_label(entry)}"})
    for key, label in (("attack", "Attack ARA (paper search)"), ("btr", "BTR ARA (paper search)"), ("ensemble", "Attack ARA (ensemble)")):
        if key in res:
            metrics.append({"type": "ara", "value": round(float(res[key]["ara"]), 6), "name": label})
    front = {
        "library_name": "robustx",
        "tags": ["image-classification", "adversarial-robustness", "safetensors"],
        "datasets": [dataset],
        "metrics": ["accuracy"],
        "model-index": [{"name": name, "results": [{
            "task": {"type": "image-classification", "name": "Image Classification"},
            "dataset": {"type": dataset, "name": pretty, "split": "test"},
            "metrics": metrics,
        }]}],
    }
    lines = [f"| {m['name']} | {m['value']:.4f} |" for m in metrics]
    flags = [f"- {k}: {v['message']}" for k, v in (res.get("flags") or {}).items() if v.get("raised")]
    body = [
        f"# {name}",
        "",
        f"Image classifier evaluated with robustx on {res['num_images']} {pretty} test images (the datamodule's seeded subset).",
        f"Weights: `{weights}` (safetensors; load with `robustx.io.export.load_model`). Perturbation sizes are in [0, 1] pixel",
        "space; the ARAs integrate robust accuracy over the perturbation RMSE (Woods, Chen & Teuscher 2019).",
        "",
        "| metric | value |",
        "|---|---|",
        *lines,
        "",
        "## Evaluation flags",
        "",
        *(flags or ["None raised."]),
        "",
    ]
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(body)
