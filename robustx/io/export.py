"""Export and load robustx models as safetensors files; no pickle anywhere.

A file holds the model's full ``state_dict`` (parameters and buffers: ``input_offset``,
BatchNorm statistics, the half-Huber ReLU's ``d``) plus header metadata::

    {"format": "robustx", "robustx_version": "0.1.0",
     "model_config": '{"_target_": "robustx.models.PreActResNet", ...}',
     <extra key>: <JSON-encoded value>, ...}

Loading rebuilds the network with :func:`robustx.models.build_model`, which only accepts the
allowlisted targets of :data:`robustx.models.MODEL_TARGETS`, so a file is pure data: reading it
never imports or runs code named inside it.

Every extra metadata value is stored JSON-encoded (strings too) and decoded on read, so
``str``, numbers, lists and dicts round-trip with their types.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from robustx import __version__
from robustx.models import MODEL_TARGETS, ModelConfigError, build_model
from robustx.io.files import atomic_path
from robustx.utils import one_line

__all__ = ["ExportError", "save_model", "load_model", "read_metadata", "FORMAT_NAME"]

logger = logging.getLogger(__name__)

FORMAT_NAME = "robustx"
_RESERVED_KEYS = ("format", "robustx_version", "model_config")


class ExportError(ValueError):
    """A model file cannot be written or read (missing, corrupt, or describing another model)."""



def _check_model_config(model_config: Any) -> str:
    if not isinstance(model_config, Mapping):
        raise ExportError(
            f"model_config must be a dict like {{'_target_': 'robustx.models.PreActResNet', ...}}, "
            f"got {type(model_config).__name__}."
        )
    target = model_config.get("_target_")
    if target not in MODEL_TARGETS:
        raise ExportError(
            f"model_config['_target_'] is {target!r}, which load_model could not rebuild; "
            f"use one of {sorted(MODEL_TARGETS)}."
        )
    try:
        return json.dumps(dict(model_config), sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ExportError(
            f"model_config must be JSON-serializable (lists, numbers, strings): {one_line(err)}."
        ) from None


def _encode_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise ExportError(f"metadata keys must be strings, got {key!r}.")
        if key in _RESERVED_KEYS:
            raise ExportError(
                f"metadata key {key!r} is reserved; rename it (reserved: {', '.join(_RESERVED_KEYS)})."
            )
        try:
            out[key] = json.dumps(value, sort_keys=True)
        except (TypeError, ValueError) as err:
            raise ExportError(
                f"metadata[{key!r}] must be JSON-serializable: {one_line(err)}; convert it to "
                "lists/numbers/strings first."
            ) from None
    return out


def _cpu_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise ExportError(
                f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; safetensors "
                "stores tensors only, so drop it from get_extra_state()."
            )
        # A fresh, contiguous CPU copy: no shared storage (safetensors refuses aliasing).
        tensors[key] = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    return tensors


def _file_mode(path: Path) -> int:
    """Permissions for the new file: the old file's, else the usual 0o666 minus the umask."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    model_config: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s full state_dict and its config to a safetensors file, atomically.

    The file is written to a temporary file next to ``path`` and moved into place with
    :func:`os.replace`, so ``path`` is either the old file or the complete new one.

    Args:
        model: the network (any device; tensors are copied to CPU).
        path: destination, conventionally ``*.safetensors``; parent folders are created.
        model_config: the ``{"_target_": "robustx.models.PreActResNet", **kwargs}`` dict that
            :func:`robustx.models.build_model` accepts and that rebuilds ``model``.
        metadata: extra JSON-serializable values stored in the header (e.g. ``source``).

    Returns:
        The destination path.

    Raises:
        ExportError: a tensor holds NaN/inf (nothing is written).
    """
    from safetensors.torch import save

    path = Path(path)
    header = {
        "format": FORMAT_NAME,
        "robustx_version": __version__,
        "model_config": _check_model_config(model_config),
        **_encode_metadata(metadata),
    }
    tensors = _cpu_tensors(model)
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:  # a diverged network is not a model: never publish it under the name of a good one
        raise ExportError(f"refusing to export to '{path}': {len(bad)} tensors hold NaN/inf (e.g. {bad[0]}); "
                          "the training diverged: resume from a good checkpoint with a lower learning rate.")
    # Serialized in memory, written by Python: a full disk is an OSError naming the file (safetensors'
    # own file writer reports it as a SafetensorError without the errno).
    data = save(tensors, metadata=header)
    with atomic_path(path, mode=_file_mode(path)) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # the weights are on disk before the rename publishes them
    logger.info("saved %d tensors to %s", len(tensors), path)
    return path


def _read_header(path: Path) -> tuple[dict[str, str], list[str]]:
    """Return (raw string metadata, tensor keys) without reading tensor data."""
    from safetensors import safe_open

    if not path.is_file():
        raise ExportError(
            f"no model file at '{path}'; check the path or export one with robustx.io.export.save_model."
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            keys = list(f.keys())
    except Exception as err:  # safetensors raises SafetensorError / OSError on bad headers
        raise ExportError(
            f"'{path}' is not a readable safetensors file ({one_line(err)}); it may be truncated "
            "or corrupt: re-export it with robustx.io.export.save_model."
        ) from None
    return dict(raw), keys


def _decode_metadata(path: Path, raw: Mapping[str, str]) -> dict[str, Any]:
    if "model_config" not in raw:
        raise ExportError(
            f"'{path}' has no 'model_config' metadata, so the network cannot be rebuilt; "
            "export it with robustx.io.export.save_model(model, path, model_config=...)."
        )
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("format", "robustx_version"):
            out[key] = value
            continue
        try:
            out[key] = json.loads(value)
        except RecursionError:  # nested deeper than the JSON decoder's stack: no config of ours is
            raise ExportError(f"'{path}' has metadata '{key}' nested too deeply to read; it was not written by "
                              "robustx.io.export.save_model.") from None
        except ValueError:
            if key == "model_config":
                raise ExportError(
                    f"'{path}' has a 'model_config' that is not valid JSON; re-export it with "
                    "robustx.io.export.save_model."
                ) from None
            out[key] = value  # written by another tool: keep the raw string
    if not isinstance(out["model_config"], dict):
        raise ExportError(
            f"'{path}' has a 'model_config' that is not a JSON object; re-export it with "
            "robustx.io.export.save_model."
        )
    return out


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a model file's header metadata (``model_config`` and extras decoded from JSON)."""
    path = Path(path)
    raw, _ = _read_header(path)
    return _decode_metadata(path, raw)


def _preview(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def _check_shapes_and_dtypes(path: Path, expected: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    """Each stored tensor's shape equals the model's and its dtype is of the same kind (float vs integer), from the header alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            if key not in expected:
                continue
            sl = f.get_slice(key)
            shape, dtype = list(sl.get_shape()), str(sl.get_dtype()).upper()
            want = expected[key]
            if shape != list(want.shape):
                raise ExportError(
                    f"'{path}': tensor '{key}' has shape {shape} but {config.get('_target_')} with this model_config needs "
                    f"{list(want.shape)}; the header's config does not describe these weights: re-export the model."
                )
            if (dtype in _FLOAT_DTYPES) != want.is_floating_point():
                raise ExportError(
                    f"'{path}': tensor '{key}' is stored as {dtype} but the model needs a "
                    f"{'floating-point' if want.is_floating_point() else 'integer'} tensor ({want.dtype}); "
                    "the file was altered or not written by save_model: re-export the model."
                )


def load_model(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model` and load its tensors.

    Args:
        path: a ``.safetensors`` file written by :func:`save_model`.
        map_location: device for the returned model.
        strict: require the file's tensor keys to match the rebuilt model's exactly.

    Returns:
        ``(model, metadata)``: the model in eval mode, and the header metadata with
        ``model_config`` (and every extra value) decoded from JSON.
    """
    from safetensors import safe_open

    path = Path(path)
    raw, keys = _read_header(path)
    metadata = _decode_metadata(path, raw)
    config = metadata["model_config"]
    # A skeleton on the meta device first: sizes read from the header (a negative or huge width)
    # are checked against the file's tensors before any memory is allocated.
    try:
        with torch.device("meta"):
            skeleton = build_model(config)
    except ModelConfigError as err:
        raise ExportError(
            f"'{path}' describes a model robustx cannot build ({one_line(err).rstrip('.')}); "
            "only robustx.models.MODEL_TARGETS can be loaded."
        ) from None
    except (ValueError, RuntimeError, TypeError, OverflowError) as err:
        raise ExportError(
            f"'{path}' has a model config robustx cannot build ({one_line(err)[:200]}); re-export it with "
            "robustx.io.export.save_model."
        ) from None

    expected = skeleton.state_dict()
    missing = [k for k in expected if k not in keys]
    unexpected = [k for k in keys if k not in expected]
    if strict and (missing or unexpected):
        raise ExportError(
            f"'{path}' does not match {config.get('_target_')}: {len(missing)} missing keys "
            f"[{_preview(missing)}], {len(unexpected)} unexpected keys [{_preview(unexpected)}]; "
            "re-export it from a model built with its model_config, or pass strict=False."
        )
    _check_shapes_and_dtypes(path, expected, config)
    model = build_model(config)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in keys if k in expected or strict}
    except Exception as err:
        raise ExportError(
            f"'{path}' has unreadable tensor data ({one_line(err)}); it may be truncated: "
            "re-export it with robustx.io.export.save_model."
        ) from None

    # Keep the saved floating dtype (e.g. a half-precision export) when it is uniform.
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(float_dtypes) == 1:
        (dtype,) = float_dtypes
        if dtype != torch.float32:
            model = model.to(dtype)
    try:
        model.load_state_dict(tensors, strict=strict)
    except RuntimeError as err:
        raise ExportError(
            f"'{path}' does not fit {config.get('_target_')} ({one_line(err)[:300]}); re-export it "
            "from a model built with its model_config."
        ) from None
    model.to(map_location)
    model.eval()
    logger.info("loaded %s from %s", config.get("_target_"), path)
    return model, metadata
