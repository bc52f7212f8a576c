"""explain.py's job: adversarial explanations (and baseline maps) of a user's image files, as PNG grids + JSON."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from datamodules.cifar10 import CIFAR10_CLASSES
from datamodules.fashion_mnist import FASHION_MNIST_CLASSES
from jobs.loading import load_classifier
from robustx.io.files import atomic_write

log = logging.getLogger(__name__)


#: Input sizes of the model classes when the checkpoint does not record one (image_size= overrides).
_DEFAULT_SIZES = {"PreActResNet": 32, "resnet44": 32, "TorchvisionClassifier": 224}


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if OmegaConf.is_list(value):
        return list(OmegaConf.to_container(value, resolve=True))
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _target_item(item: Any) -> str | int:
    """Hydra/YAML read ``true`` as a boolean: turn it back into the keyword."""
    if item is True:
        return "true"
    if isinstance(item, bool) or not isinstance(item, (str, int)):
        raise ValueError(f"bad target {item!r}; use true, second, all, a class index or a class name, e.g. targets=[true,second,all].")
    return item


def settings(cfg: DictConfig) -> dict[str, Any]:
    """Check and collect the run's settings (user errors raise one-line ValueErrors)."""
    from robustx.explain.attribution import METHODS

    rho, steps, overshoot = float(cfg.rho), int(cfg.steps), float(cfg.overshoot)
    if not rho > 0:
        raise ValueError(f"rho must be > 0 (an RMSE budget on [0, 1] pixels; the paper uses 0.1), got {cfg.rho}; e.g. rho=0.1.")
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (the paper uses 35), got {cfg.steps}; e.g. steps=35.")
    if not overshoot > 0:
        raise ValueError(f"overshoot must be > 0 (the paper uses 5), got {cfg.overshoot}.")
    targets = [_target_item(t) for t in _as_list(cfg.targets)]
    if not targets:
        raise ValueError("targets is empty; use e.g. targets=[true,second,all].")
    baselines = [str(b) for b in _as_list(cfg.baselines)]
    bad = [b for b in baselines if b not in METHODS]
    if bad:
        raise ValueError(f"unknown baseline(s) {bad}; choose from {list(METHODS)}, or baselines=[] to skip them.")
    device = str(cfg.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device} but CUDA is not available here; use device=cpu.")
    return {"rho": rho, "steps": steps, "overshoot": overshoot, "targets": targets, "baselines": baselines,
            "bf16": bool(cfg.bf16), "channels_last": bool(cfg.channels_last),
            "compile": bool(cfg.get("compile", False)), "device": device}


def input_format(model: nn.Module, info: dict[str, Any], image_size: Any = None) -> tuple[int, tuple[int, int], str]:
    """(channels, (H, W), where the size came from) of the model's inputs.

    The size is, in order: ``image_size`` (int or [H, W]); the checkpoint's ``image_size``
    metadata; an authors' checkpoint's ``arch[0]``; the model class's usual size (SmallCNN 28
    for 1 channel else 32, PreActResNet 32, torchvision 224).
    """
    offset = getattr(model, "input_offset", None)
    if not isinstance(offset, torch.Tensor) or offset.dim() != 2:
        raise ValueError("the model has no input_offset buffer (2, C), so its channel count is unknown; load a robustx model.")
    channels = int(offset.size(1))
    src = "image_size="
    size = image_size
    if size is None:
        meta = info.get("metadata") or {}
        size, src = meta.get("image_size"), "checkpoint metadata"
    if size is None:
        arch = (info.get("training_options") or {}).get("arch")
        if isinstance(arch, (list, tuple)) and arch and isinstance(arch[0], int):
            size, src = arch[0], "the checkpoint's training_options arch"
    if size is None:
        cls = type(model).__name__
        size = 28 if cls == "SmallCNN" and channels == 1 else _DEFAULT_SIZES.get(cls, 32)
        src = f"the usual size for {cls}; set image_size= to change it"
    if OmegaConf.is_list(size):
        size = list(size)
    hw = (int(size), int(size)) if isinstance(size, (int, float, str)) else tuple(int(s) for s in size)
    if len(hw) != 2 or min(hw) <= 0:
        raise ValueError(f"image_size must be a positive int or [H, W], got {image_size}.")
    return channels, hw, src


def default_class_names(num_classes: int, channels: int) -> list[str] | None:
    """CIFAR-10 names for 10-class RGB models, Fashion-MNIST names for 10-class grayscale ones, else None (indices)."""
    if num_classes == 10 and channels == 3:
        return list(CIFAR10_CLASSES)
    if num_classes == 10 and channels == 1:
        return list(FASHION_MNIST_CLASSES)
    return None


def _resolve_label(item: Any, num_classes: int, names: Sequence[str] | None) -> int | None:
    from robustx.explain.adversarial import resolve_targets

    if item is None or (isinstance(item, str) and item.lower() in ("", "none", "null", "?")):
        return None
    if isinstance(item, bool):
        raise ValueError(f"bad label {item!r}; use a class index or name, or null for unknown.")
    try:
        return int(resolve_targets(torch.zeros(1, num_classes), None, item, class_names=names)[0, 0])
    except ValueError as err:
        raise ValueError(f"labels: {err}") from None


def _write_json(path: Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 2
    while stem in used:
        stem, n = f"{path.stem}-{n}", n + 1
    used.add(stem)
    return stem


def explain(cfg: DictConfig) -> dict[str, Any]:
    """Explain every image of ``cfg.images`` with the model of ``cfg.ckpt``; returns {"outputs": [...], "failures": [...]}.

    Unreadable images are logged (one line each) and listed under ``failures``; the others are
    processed. Settings errors (rho <= 0, unknown class names, missing checkpoint) raise
    one-line ValueError / FileNotFoundError before any work.
    """
    from robustx.explain.attribution import attribution_maps
    from robustx.explain.adversarial import adversarial_explanations, resolve_targets
    from robustx.explain.figures import explanation_grid, save_png
    from robustx.io.images import load_images

    start = time.time()
    s = settings(cfg)
    ckpt = Path(hydra.utils.to_absolute_path(str(cfg.ckpt)))
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt '{cfg.ckpt}' does not exist; pass a .ckpt, .safetensors or an authors' .pt file.")
    images = [str(p) for p in _as_list(cfg.images)]
    if not images:
        raise ValueError("images is empty; pass image files, e.g. images=[examples/images/cat.jpg].")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))

    model, info = load_classifier(ckpt)
    model.to(s["device"])
    channels, size, size_src = input_format(model, info, cfg.get("image_size"))
    with torch.no_grad():
        num_classes = int(model(torch.zeros(1, channels, *size, device=s["device"])).shape[1])
    if cfg.get("class_names") is not None:
        names = [str(n) for n in _as_list(cfg.class_names)]
        if len(names) != num_classes:
            raise ValueError(f"class_names has {len(names)} names but the model has {num_classes} classes; pass one name per class.")
    else:
        names = default_class_names(num_classes, channels)
    # Unknown class names / indices in targets fail here, before any image is touched.
    resolve_targets(torch.zeros(1, num_classes), None, s["targets"], class_names=names)
    labels = _as_list(cfg.get("labels"))
    if labels and len(labels) != len(images):
        raise ValueError(f"labels has {len(labels)} entries for {len(images)} images; give one per image (null for unknown) or none.")
    label_ids = [_resolve_label(item, num_classes, names) for item in labels] or [None] * len(images)
    log.info("%s (%s): %d classes, input (%d, %d, %d) [size from %s]; classes: %s", ckpt.name, info["format"], num_classes,
             channels, *size, size_src, ", ".join(names) if names else "indices 0..%d" % (num_classes - 1))

    out_dir = Path(hydra.utils.to_absolute_path(str(cfg.out_dir))) if cfg.get("out_dir") else Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_images([hydra.utils.to_absolute_path(p) for p in images], channels=channels, size=size)
    label_of = {Path(hydra.utils.to_absolute_path(p)): lab for p, lab in zip(images, label_ids)}
    given = {Path(hydra.utils.to_absolute_path(p)): p for p in images}  # paths as the user wrote them
    for path, msg in loaded.failures:
        log.error("ImageLoadError: %s", msg.replace(str(path), given.get(path, str(path))))
    name = lambda c: names[c] if names else str(c)  # noqa: E731
    outputs, used = [], set()
    for i, path in enumerate(loaded.paths):
        t0 = time.time()
        x = loaded.images[i : i + 1].to(s["device"])  # (1, C, H, W)
        label = label_of.get(path)
        y = None if label is None else torch.tensor([label], device=s["device"])
        with torch.no_grad():
            probs = model(x).float().softmax(1)[0]  # (num_classes,)
        res = adversarial_explanations(
            model, x, y, targets=s["targets"], rho=s["rho"], steps=s["steps"], overshoot=s["overshoot"],
            autocast_dtype=torch.bfloat16 if s["bf16"] else None, channels_last=s["channels_last"], compile=s["compile"],
            class_names=names, all_skips_listed=True,  # "all" adds only the classes not listed: each class once
        )
        kinds = res.kinds[0]  # (K,) "true", "second", "all", "class" (no padding for a single image)
        t_ae = time.time() - t0
        explained = int(res.pred_before[0]) if label is None else label
        maps, t_maps = {}, {}
        if s["baselines"]:
            if "true" in kinds:  # the AE's own map: per-pixel RMSE over channels of AE(true) - image
                j = kinds.index("true")
                maps["ae"] = (res.images[:, j] - x).float().pow(2).mean(1).sqrt()  # (1, H, W)
            for m in s["baselines"]:
                t1 = time.time()
                maps[m] = attribution_maps(model, x, torch.tensor([explained], device=s["device"]), method=m,
                                           rho=s["rho"], ae_steps=s["steps"])  # (1, H, W)
                t_maps[m] = time.time() - t1
        t2 = time.time()
        fig = explanation_grid(
            x, res.images, res.targets, res.prob_before, res.prob_after, class_names=names, kinds=kinds,
            preds=res.pred_before, pred_probs=probs[res.pred_before], labels=None if y is None else y, baselines=maps or None,
            baseline_targets=torch.tensor([explained]), row_titles=[path.name],
            title=f"{ckpt.name}: adversarial explanations, rho={s['rho']:g}, {s['steps']} steps",
        )
        stem = _unique_stem(path, used)
        png = save_png(fig, out_dir / f"{stem}.png", dpi=int(cfg.get("dpi", 150)))
        t_fig = time.time() - t2
        seconds = time.time() - t0
        rows = [
            {"kind": kinds[j], "class": int(res.targets[0, j]), "name": name(int(res.targets[0, j])),
             "prob_before": float(res.prob_before[0, j]), "prob_after": float(res.prob_after[0, j]),
             "rmse": float(res.rmse[0, j]), "pred_after": int(res.pred_after[0, j]), "pred_after_name": name(int(res.pred_after[0, j]))}
            for j in range(len(kinds)) if kinds[j] is not None
        ]
        pred = int(res.pred_before[0])
        record = {
            "image": given.get(path, str(path)), "preprocessing": loaded.notes[i], "input_shape": [channels, *size],
            "checkpoint": str(cfg.ckpt), "format": info["format"], "model_config": info.get("model_config"),
            "class_names": names if names else [str(c) for c in range(num_classes)],
            "label": label, "label_name": None if label is None else name(label),
            "pred_before": pred, "pred_before_name": name(pred), "probs_before": probs.cpu().tolist(),
            "explained_class": explained, "targets": rows,
            "settings": {**s, "image_size": list(size), "class_names_given": cfg.get("class_names") is not None},
            "seconds": {"total": seconds, "adversarial_explanations": t_ae, "baselines": t_maps, "figure": t_fig},
            "png": png.name, "versions": {"torch": torch.__version__},
        }
        _write_json(out_dir / f"{stem}.json", record)
        t_true = [r for r in rows if r["kind"] == "true"]
        gist = f"; AE toward {t_true[0]['name']}: p {t_true[0]['prob_before']:.2f} -> {t_true[0]['prob_after']:.2f}" if t_true else ""
        log.info("%s: pred %s (p %.2f)%s; %d AEs in %.1f s, baselines %.1f s, total %.1f s -> %s", path.name, name(pred),
                 float(probs[pred]), gist, len(rows), t_ae, sum(t_maps.values()), seconds, png)
        outputs.append(record)
    total = time.time() - start
    if outputs:
        per = sum(o["seconds"]["total"] for o in outputs) / len(outputs)
        log.info("explained %d image(s) in %.1f s (%.2f s/image) -> %s", len(outputs), total, per, out_dir)
    if loaded.failures:
        log.error("%d of %d image(s) could not be read (see the errors above); the others were explained.",
                  len(loaded.failures), len(images))
    return {"outputs": outputs, "failures": [(given.get(p, str(p)), m) for p, m in loaded.failures], "out_dir": str(out_dir)}
