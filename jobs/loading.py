"""Load a classifier from any of the project's formats, never executing pickled code."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

import robustx
from robustx.models import build_model


class CheckpointError(ValueError):
    """A checkpoint path is missing or in an unknown format."""


def load_classifier(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load (model in eval mode, info) from a Lightning ``.ckpt``, an exported ``.safetensors`` or an authors' ``.pt``.

    Lightning checkpoints are pre-scanned by :func:`robustx.io.pickle_scan.scan_checkpoint` (size
    cap :data:`~robustx.io.pickle_scan.CKPT_MAX_BYTES`, globals, depth, claimed storage sizes), then
    read with ``torch.load(weights_only=True)`` and rebuilt from the allowlisted model config they
    carry; exports need no pickle at all; the authors' legacy files go through
    :mod:`robustx.io.legacy`'s restricted loader (scanned the same way).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass a .ckpt, .safetensors or reference .pt file.")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from robustx.io.export import load_model

        try:
            model, meta = load_model(path)
        except RecursionError:  # json.loads of a model_config nested thousands deep
            raise CheckpointError(f"refusing to load '{path}': its header metadata nests JSON too deeply to decode; "
                                  "re-export it with robustx.io.export.save_model.") from None
        return model, {"format": "safetensors", "model_config": meta["model_config"], "metadata": meta}
    if suffix == ".pt":
        from robustx.io.legacy import import_reference_checkpoint

        model, info = import_reference_checkpoint(path)
        return model, {"format": "reference", **info}
    if suffix == ".ckpt":
        try:
            ckpt = read_lightning_checkpoint(path)
        except CheckpointError as err:
            raise CheckpointError(f"'{path}' is not a readable Lightning checkpoint ({err}); pass the run's "
                                  "checkpoints/last.ckpt or its model.safetensors.") from None
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_config"), dict) or not isinstance(ckpt.get("state_dict"), dict):
            raise CheckpointError(f"'{path}' was not written by this project's RobustClassifier (no model_config/state_dict); "
                                  "pass the run's checkpoints/last.ckpt or its model.safetensors.")
        state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if isinstance(k, str) and k.startswith("model.")}
        try:
            with torch.device("meta"):  # sizes from the file checked against its tensors before allocating
                skeleton = build_model(ckpt["model_config"])
            shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
            bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor) or shapes.get(k) != tuple(v.shape)]
            if bad or set(shapes) != set(state):
                raise CheckpointError(f"'{path}': its weights do not fit its model_config ({len(bad)} mismatched, "
                                      f"{len(set(shapes) - set(state))} missing tensors, e.g. {(bad or sorted(set(shapes) - set(state)))[:2]}).")
            model = build_model(ckpt["model_config"])
            model.load_state_dict(state, strict=True)
        except CheckpointError:
            raise
        except (ValueError, RuntimeError, TypeError, OverflowError) as err:
            why = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise CheckpointError(f"'{path}' holds a model robustx cannot rebuild ({why}).") from None
        return model.eval(), {"format": "lightning", "model_config": ckpt["model_config"], "epoch": ckpt.get("epoch")}
    raise CheckpointError(f"unknown checkpoint format '{suffix}' for '{path}'; use .ckpt, .safetensors or an authors' .pt.")


def read_lightning_checkpoint(path: str | Path) -> Any:
    """The object in a Lightning ``.ckpt``, read without running pickled code; :class:`CheckpointError` with the cause.

    The opcode scan first (:mod:`robustx.io.pickle_scan`: bounded memory and depth, nothing built), then
    torch's weights-only loader. The error's message is the one-line cause, for the caller to put in its
    own sentence (``load_classifier``, ``train.py ckpt_path=``).
    """
    from robustx.io.pickle_scan import CKPT_MAX_BYTES, PickleScanError, scan_checkpoint

    try:
        scan_checkpoint(path, max_file_bytes=CKPT_MAX_BYTES)
    except PickleScanError as err:
        raise CheckpointError(f"{err}; refused by the weights-only loader's opcode scan") from None
    except OSError as err:
        raise CheckpointError(f"cannot be read: {err.strerror or err}") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt files raise many types; refused globals raise UnpicklingError
        # torch's message leads with advice to retry with weights_only=False: keep only the cause.
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        causes = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Please file", "Check the documentation"))]
        why = (causes[0] if causes else lines[0] if lines else type(err).__name__) + " (refused by the weights-only loader)" * bool(
            "Weights only" in str(err))
        raise CheckpointError(why[:200]) from None


def checkpoint_paths(ckpt: Any) -> list[Path]:
    """A ``ckpt=`` config value (one path or a list) -> absolute, existing checkpoint paths.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: the list is empty.
    """
    import hydra
    from omegaconf import OmegaConf

    ckpts = list(ckpt) if OmegaConf.is_list(ckpt) else [ckpt]
    paths = [Path(hydra.utils.to_absolute_path(str(c))) for c in ckpts]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"ckpt '{p}' does not exist; pass a .ckpt, .safetensors or an authors' .pt file.")
    if not paths:
        raise ValueError("ckpt is an empty list; pass one or more checkpoint paths, e.g. 'ckpt=[a.pt,b.pt]'.")
    return paths


def output_stems(paths: list[Path]) -> list[str]:
    """One distinct, readable output name per checkpoint: the file stem, prefixed by parent folders where stems collide.

    Every training run exports ``model.safetensors``, so ``[runA/model.safetensors, runB/model.safetensors]``
    must not both write ``model.json``: they become ``runA_model`` and ``runB_model``. A unique
    stem stays as it is.
    """
    parts = [Path(p).resolve().parts[:-1] for p in paths]
    stems = [Path(p).stem for p in paths]
    names = list(stems)
    depth = 0
    while len(set(names)) < len(names):
        depth += 1
        clash = {n for n in names if names.count(n) > 1}
        for i, n in enumerate(names):
            if n in clash:
                prefix = [q for q in parts[i][max(0, len(parts[i]) - depth):] if q != "/"]
                names[i] = "_".join([*prefix, stems[i]])
        if depth > max(len(p) for p in parts):  # the same file twice: number them
            seen: dict[str, int] = {}
            for i, n in enumerate(names):
                seen[n] = seen.get(n, 0) + 1
                names[i] = n if seen[n] == 1 else f"{n}-{seen[n]}"
            break
    return names


def versions(device: str = "cpu") -> dict[str, str]:
    """Software and machine versions recorded in every result file (eval, study, bench)."""
    import pytorch_lightning

    where = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else platform.machine()
    return {"python": platform.python_version(), "torch": torch.__version__, "pytorch_lightning": pytorch_lightning.__version__,
            "robustx": robustx.__version__, "machine": platform.machine(), "threads": str(torch.get_num_threads()),
            "device": where}
