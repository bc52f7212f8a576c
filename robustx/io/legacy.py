"""Import the paper authors' reference CIFAR-10 checkpoints without executing pickled code.

The files are legacy (non-zip) ``torch.save`` pickles holding ``{'model_params': state_dict,
'training_options': {...}}``, where ``training_options['arch']`` references the function
``__main__.cifar10_preprocess``. They are read with ``torch.load(weights_only=True)`` (torch's
restricted unpickler) inside :func:`torch.serialization.safe_globals`, which maps that one name
to an inert placeholder. Every other global (``os.system``, ``builtins.eval``, ...) is refused
before it can run, and the placeholder itself refuses to be called. Before that,
:func:`robustx.io.pickle_scan.scan_checkpoint` reads the pickles' opcodes (nothing is built) and
refuses files over :data:`~robustx.io.pickle_scan.LEGACY_MAX_BYTES`, memory bombs (storages
claiming more bytes than the file holds, huge ``bytearray`` sizes) and recursion bombs (deep
nesting, reference cycles), so every refusal is one line and memory stays bounded.

Command line::

    python -m robustx.io.legacy ../shared/reference-checkpoints/*.pt --out weights/
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustx.io import pickle_scan
from robustx.io.export import save_model
from robustx.models import ModelConfigError, build_model
from robustx.utils import one_line

__all__ = [
    "LegacyCheckpointError",
    "PREPROCESS_NAME",
    "read_reference_checkpoint",
    "import_reference_checkpoint",
    "convert_reference_checkpoint",
    "main",
]

logger = logging.getLogger(__name__)

#: The only global the reference checkpoints name (inside ``training_options['arch']``).
PREPROCESS_NAME = "__main__.cifar10_preprocess"
_ADVICE = "only the authors' reference checkpoints are supported; never torch.load untrusted files"


class LegacyCheckpointError(ValueError):
    """A legacy checkpoint cannot be imported safely (or is not one of the authors')."""


class _PlaceholderCalled(Exception):
    """Raised when a pickle tries to call the placeholder (the real files only name it)."""


def _cifar10_preprocess_placeholder(*args: Any, **kwargs: Any) -> None:
    """Inert stand-in for ``__main__.cifar10_preprocess``: it is referenced, never run."""
    raise _PlaceholderCalled



def _describe(err: BaseException) -> str:
    text = " ".join(str(err).split())[:200].rstrip(".")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _refused_global(message: str) -> str | None:
    """The global that torch's restricted unpickler refused, as ``module.name``, if any."""
    match = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", message)
    if match is None:
        match = re.search(r"unrecognized function (.+?)(?: which belongs|$)", message, re.MULTILINE)
    if match is None:
        match = re.search(r"allowlisted via `add_safe_globals` but got (.+?)$", message, re.MULTILINE)
    if match is None:
        return None
    name = match.group(1).strip()
    # torch reports builtins without their module ("eval" for builtins.eval).
    return name if ("." in name or name.startswith("<")) else f"builtins.{name}"


def _inner_reason(message: str) -> str:
    """The unpickler's own complaint inside torch's long "Weights only load failed" text."""
    parts = [
        p.strip()
        for p in message.split("\n\n")
        if p.strip() and not p.strip().startswith(("Weights only load failed", "Check the documentation"))
    ]
    return one_line(parts[-1] if parts else message)[:200]


def _scan_refusal(path: Path, err: pickle_scan.PickleScanError) -> LegacyCheckpointError:
    """The one-line error for a file the opcode pre-scan refused."""
    if err.called:
        return LegacyCheckpointError(
            f"refusing to load '{path}': it asks to call '{err.global_name}', which the reference "
            f"checkpoints only name; {_ADVICE}."
        )
    if err.malformed:
        return LegacyCheckpointError(
            f"cannot read '{path}' safely ({err}): it is truncated or not one of the authors' checkpoints; {_ADVICE}."
        )
    return LegacyCheckpointError(f"refusing to load '{path}': {err}; {_ADVICE}.")


#: Largest tensor copied into ``training_options`` as a JSON list (the real files hold none).
_JSON_TENSOR_LIMIT = 1024


def _replace_placeholder(obj: Any) -> Any:
    """Copy of ``obj`` with every placeholder reference replaced by its name."""
    if obj is _cifar10_preprocess_placeholder:
        return PREPROCESS_NAME
    if isinstance(obj, Mapping):
        return {k: _replace_placeholder(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_replace_placeholder(v) for v in obj)
    return obj


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        if obj.numel() > _JSON_TENSOR_LIMIT:  # a list of Python floats takes ~8x the tensor's memory
            return f"<tensor of shape {list(obj.shape)}, {obj.dtype}>"
        return obj.tolist()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def read_reference_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an authors' checkpoint without running any pickled code.

    Args:
        path: one of ``resnet44-{standard,adv-train,robust,all}.pt``.

    Returns:
        ``(state_dict, training_options)`` with CPU tensors; the pickled function reference in
        ``training_options['arch']`` is replaced by the string ``"__main__.cifar10_preprocess"``.

    Raises:
        LegacyCheckpointError: missing or unreadable file, a pickle that asks to run anything
            besides tensor rebuilding, or content that is not ``{'model_params', 'training_options'}``.
    """
    path = Path(path)
    if not path.is_file():
        raise LegacyCheckpointError(
            f"no checkpoint at '{path}'; pass one of the authors' resnet44-*.pt files "
            "(see shared/reference-checkpoints/README.md)."
        )
    try:  # opcodes first: bounded memory and depth, one line for every refusal
        pickle_scan.scan_checkpoint(
            path,
            max_file_bytes=pickle_scan.LEGACY_MAX_BYTES,
            allowed_globals=pickle_scan.CHECKPOINT_GLOBALS | {PREPROCESS_NAME},
        )
    except pickle_scan.PickleScanError as err:
        raise _scan_refusal(path, err) from None
    except OSError as err:
        raise LegacyCheckpointError(f"cannot read '{path}' ({_describe(err)}).") from None
    try:
        with torch.serialization.safe_globals([(_cifar10_preprocess_placeholder, PREPROCESS_NAME)]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except _PlaceholderCalled:
        raise LegacyCheckpointError(
            f"refusing to load '{path}': it asks to call '{PREPROCESS_NAME}', which the reference "
            f"checkpoints only name; {_ADVICE}."
        ) from None
    except pickle.UnpicklingError as err:
        name = _refused_global(str(err))
        if name is not None:
            raise LegacyCheckpointError(f"refusing to load '{path}': it asks to run '{name}'; {_ADVICE}.") from None
        raise LegacyCheckpointError(
            f"cannot read '{path}' safely ({_inner_reason(str(err))}): it is truncated or not one of the "
            f"authors' checkpoints; {_ADVICE}."
        ) from None
    except LegacyCheckpointError:
        raise
    except Exception as err:  # truncated / not a torch file: unpickling can fail in many ways
        raise LegacyCheckpointError(
            f"cannot read '{path}' as a torch checkpoint ({_describe(err)}); "
            "it may be truncated: fetch the authors' file again."
        ) from None

    if not (
        isinstance(obj, Mapping)
        and isinstance(obj.get("model_params"), Mapping)
        and isinstance(obj.get("training_options"), Mapping)
    ):
        raise LegacyCheckpointError(
            f"'{path}' is not one of the authors' checkpoints: expected a dict with 'model_params' "
            "and 'training_options'; use robustx.io.export.load_model for robustx files."
        )
    state = dict(obj["model_params"])
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise LegacyCheckpointError(
            f"'{path}' is not one of the authors' checkpoints: model_params[{bad[0]!r}] is not a tensor."
        )
    return state, _replace_placeholder(dict(obj["training_options"]))


def _model_config(path: Path, opts: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``build_model`` config of the PreActResNet described by ``training_options``."""
    try:
        _size, _preprocess, block_lens, widths, num_classes = opts["arch"]
        block_lens = [int(n) for n in block_lens]
        widths = [int(w) for w in widths]
        num_classes = int(num_classes)
    except (KeyError, TypeError, ValueError):
        raise LegacyCheckpointError(
            f"'{path}' has no usable training_options['arch'] (expected [size, preprocess, "
            f"block_lens, widths, num_classes], got {one_line(repr(opts.get('arch')), limit=120)})."
        ) from None
    if len(set(block_lens)) != 1 or len(block_lens) != len(widths):
        raise LegacyCheckpointError(
            f"'{path}' has arch {block_lens}/{widths}; PreActResNet needs one block count for every stage."
        )
    if "input_offset" in state:
        offset = state["input_offset"]
        if offset.dim() != 2 or offset.shape[0] != 2 or offset.shape[1] > 16:
            raise LegacyCheckpointError(
                f"'{path}' has an input_offset of shape {list(offset.shape)}; the paper's networks store (2, channels)."
            )
        mean, std = offset.tolist()
    else:
        try:
            mean, std = opts["input_offset"]
        except (KeyError, TypeError, ValueError):
            raise LegacyCheckpointError(f"'{path}' stores no input_offset (mean/std).") from None
    # Prefer the authors' decimal values over their float32 rounding when they agree.
    if "input_offset" in opts:
        try:
            o_mean, o_std = ([float(v) for v in row] for row in opts["input_offset"])
            if len(o_mean) == len(mean) and all(
                abs(a - b) < 1e-6 for a, b in zip(o_mean + o_std, list(mean) + list(std))
            ):
                mean, std = o_mean, o_std
        except (TypeError, ValueError):
            pass
    return {
        "_target_": "robustx.models.PreActResNet",
        "depth": 6 * block_lens[0] + 2,
        "num_classes": num_classes,
        "in_channels": len(mean),
        "widths": widths,
        "activation": "hhrelu" if opts.get("robust_additions") else "relu",
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }


def import_reference_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Build the project's :class:`~robustx.models.PreActResNet` with an authors' weights.

    Returns:
        ``(model, info)``: the model in eval mode (CPU; takes [0, 1] images) and
        ``{"source": file name, "training_options": JSON-safe dict, "model_config": dict}``.
    """
    path = Path(path)
    state, opts = read_reference_checkpoint(path)
    config = _model_config(path, opts, state)
    blocks = (config["depth"] - 2) // 6 * len(config["widths"])
    if blocks > len(state):  # every block holds tensors: bounds the skeleton built below
        raise LegacyCheckpointError(
            f"'{path}' has an arch of {blocks} blocks but only {len(state)} tensors; "
            "it is not one of the authors' checkpoints."
        )
    try:
        # A skeleton on the meta device first: widths read from the file (negative, huge) are
        # checked against its tensors before any memory is allocated.
        with torch.device("meta"):
            skeleton = build_model(config)
        shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        bad = sorted(k for k in set(shapes) | set(state) if shapes.get(k) != (tuple(state[k].shape) if k in state else None))
        if bad:
            raise LegacyCheckpointError(
                f"'{path}' does not match the paper's PreActResNet layout for its arch "
                f"({len(bad)} missing, unexpected or mis-shaped tensors, e.g. {bad[:2]})."
            )
        model = build_model(config)
    except LegacyCheckpointError:
        raise
    except ModelConfigError as err:
        raise LegacyCheckpointError(
            f"'{path}' describes a network robustx cannot build ({one_line(err).rstrip('.')})."
        ) from None
    except (ValueError, RuntimeError, TypeError, OverflowError) as err:
        raise LegacyCheckpointError(
            f"'{path}' describes a network robustx cannot build ({one_line(err)[:200]})."
        ) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise LegacyCheckpointError(
            f"'{path}' does not match the paper's PreActResNet layout ({one_line(err)[:300]})."
        ) from None
    model.eval()
    info = {"source": path.name, "training_options": _json_safe(opts), "model_config": config}
    logger.info("imported %s (%s, %d tensors)", path.name, config["activation"], len(state))
    return model, info


def convert_reference_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Convert an authors' checkpoint to a robustx safetensors file (see :mod:`robustx.io.export`).

    The header metadata holds ``model_config``, ``source`` (the original file name) and
    ``training_options``.
    """
    model, info = import_reference_checkpoint(src)
    return save_model(
        model,
        dst,
        model_config=info["model_config"],
        metadata={"source": info["source"], "training_options": info["training_options"]},
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m robustx.io.legacy SRC [SRC ...] --out DIR``; returns the exit status (2: a file was refused)."""
    parser = argparse.ArgumentParser(
        prog="python -m robustx.io.legacy",
        description="Convert the paper authors' reference checkpoints to safetensors without running pickled code.",
    )
    parser.add_argument("src", nargs="+", type=Path, help="authors' .pt checkpoints")
    parser.add_argument("--out", required=True, type=Path, help="output folder (DIR/<stem>.safetensors)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")

    failures = 0
    for src in args.src:
        dst = args.out / f"{src.stem}.safetensors"
        try:
            convert_reference_checkpoint(src, dst)
        except LegacyCheckpointError as err:
            logger.error("%s", err)
            failures += 1
            continue
        print(f"{src} -> {dst}")
    if failures:
        logger.error("%d of %d checkpoints failed to convert", failures, len(args.src))
    return 2 if failures else 0  # the entry points' code for a user error: one line per file says why


if __name__ == "__main__":
    sys.exit(main())
