"""Load a user's image files as model inputs: any size, any PIL mode, converted to the model's format.

:func:`load_image` reads one file (PNG, JPEG, BMP, TIFF, GIF, WebP ...; grayscale, RGB, RGBA,
palette, 1-bit, 16-bit), converts it to the channel count the model expects (1 or 3), resizes
its shorter side to the model's input size and center-crops the rest, and returns a
(C, H, W) float tensor in [0, 1]. One INFO log line per image says what was done. Problems
raise :class:`ImageLoadError` with a one-line message naming the file, the problem and the fix.

:func:`load_images` loads many files and never loses the good ones because of a bad one: it
returns the good images stacked plus a list of (path, error message) for the others.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["ImageLoadError", "LoadedImages", "load_image", "load_images", "pil_to_tensor"]

log = logging.getLogger(__name__)

#: Channel counts a model may expect.
SUPPORTED_CHANNELS = (1, 3)

# ITU-R 601-2 luma weights, as PIL's convert("L").
_LUMA = (0.299, 0.587, 0.114)


class ImageLoadError(ValueError):
    """An image file is missing, unreadable or cannot be converted to the model's input format."""


@dataclass
class LoadedImages:
    """Result of :func:`load_images`: the good images and what went wrong with the others."""

    images: Tensor  # (N, C, H, W) in [0, 1], the readable files in input order
    paths: list[Path] = field(default_factory=list)  # (N,) their paths
    notes: list[str] = field(default_factory=list)  # (N,) what was done to each (the log line)
    failures: list[tuple[Path, str]] = field(default_factory=list)  # (path, one-line error) per bad file


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        h = w = size
    else:
        if len(size) != 2:
            raise ImageLoadError(f"image size must be an int or (H, W), got {size!r}; pass e.g. 32 or [32, 32].")
        h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ImageLoadError(f"image size must be positive, got {h}x{w}; pass the model's input size, e.g. 32.")
    return h, w


def pil_to_tensor(img, *, channels: int) -> tuple[Tensor, str]:
    """Convert a loaded PIL image of any mode to ``channels`` channels -> ((C, h, w) float32 in [0, 1], note).

    Modes: ``1``/``L``/``P``/``RGB``/``CMYK``/``YCbCr``/... go through PIL (palettes are
    expanded); alpha (``RGBA``, ``LA``, ``PA``, palettes with transparency) is composited over
    white; 16-bit (``I;16*``) is scaled by 1/65535, 32-bit ``I`` by 1/65535 when its maximum
    exceeds 255 (else 1/255), float ``F`` is clipped to [0, 1] (divided by 255 when its maximum
    exceeds 1). Grayscale <-> RGB conversion is done in float: RGB -> gray with the ITU-R 601-2
    luma weights, gray -> RGB by repeating the channel.

    Args:
        img: a PIL image whose data is already loaded.
        channels: 1 or 3.
    Returns:
        ((C, h, w) float32 tensor in [0, 1], short description of the conversion).
    """
    if channels not in SUPPORTED_CHANNELS:
        raise ImageLoadError(
            f"the model expects {channels}-channel images; image files can only be converted to 1 (grayscale) "
            "or 3 (RGB) channels: pass tensors to the library instead."
        )
    notes = [img.mode]
    mode = img.mode
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    elif mode == "P":
        img, mode = img.convert("RGB"), "RGB"
    elif mode == "PA":
        img, mode = img.convert("RGBA"), "RGBA"
    elif mode == "1":
        img, mode = img.convert("L"), "L"

    if mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float32) / 65535.0  # (h, w)
        arr = arr[None]  # (1, h, w)
    elif mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if arr.size and arr.max() > 255 else 255.0
        arr = (arr / scale).astype(np.float32)[None]  # (1, h, w)
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if arr.size and np.nanmax(arr) > 1.0:
            arr = arr / 255.0
        arr = np.nan_to_num(arr)[None]  # (1, h, w)
    elif mode in ("L", "LA", "RGB", "RGBA"):
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (c, h, w)
    else:  # CMYK, YCbCr, LAB, HSV, ...
        arr = np.asarray(img.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0  # (3, h, w)
        notes.append("RGB")
    x = torch.from_numpy(np.ascontiguousarray(arr)).clamp_(0, 1)  # (c, h, w)

    if x.size(0) in (2, 4):  # LA / RGBA: composite over white
        color, alpha = x[:-1], x[-1:]  # (c-1, h, w), (1, h, w)
        x = color * alpha + (1 - alpha)  # (c-1, h, w)
        notes.append("alpha over white")
    if x.size(0) == 3 and channels == 1:
        w = torch.tensor(_LUMA, dtype=x.dtype).view(3, 1, 1)  # (3, 1, 1)
        x = (x * w).sum(0, keepdim=True)  # (1, h, w)
        notes.append("RGB->gray")
    elif x.size(0) == 1 and channels == 3:
        x = x.expand(3, -1, -1).contiguous()  # (3, h, w)
        notes.append("gray->RGB")
    return x, ", ".join(notes)


def _resize_crop(x: Tensor, size: tuple[int, int]) -> tuple[Tensor, str]:
    """Resize so the image covers ``size`` (shorter side to the target), then center-crop -> ((C, H, W), note)."""
    import torchvision.transforms.functional as TF

    th, tw = size
    _, h, w = x.shape
    notes = []
    if (h, w) != (th, tw):
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        if (nh, nw) != (h, w):
            x = TF.resize(x[None], [nh, nw], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)[0]  # (C, nh, nw)
            x = x.clamp_(0, 1)
            notes.append(f"resized {w}x{h}->{nw}x{nh}")
        if (nh, nw) != (th, tw):
            top, left = (nh - th) // 2, (nw - tw) // 2
            x = x[:, top : top + th, left : left + tw]  # (C, th, tw)
            notes.append(f"center-cropped to {tw}x{th}")
    return x.contiguous(), ", ".join(notes) or "size kept"


def load_image(path: str | os.PathLike[str], *, channels: int, size: int | Sequence[int]) -> Tensor:
    """Load one image file as a model input -> (C, H, W) float32 in [0, 1].

    Args:
        path: image file (any format PIL reads).
        channels: channels the model expects, 1 or 3.
        size: the model's input size, an int (square) or (H, W).
    Returns:
        (channels, H, W) float32 in [0, 1].
    Raises:
        ImageLoadError: missing, unreadable or truncated file, or a channel count other than 1 or 3.
    """
    x, _ = _load(Path(path), channels=channels, size=_size_hw(size))
    return x


def _load(path: Path, *, channels: int, size: tuple[int, int]) -> tuple[Tensor, str]:
    from PIL import Image, UnidentifiedImageError

    if channels not in SUPPORTED_CHANNELS:
        raise ImageLoadError(
            f"{path}: the model expects {channels}-channel images but image files can only be converted to 1 or 3 "
            "channels; use a 1- or 3-channel model or pass tensors to the library."
        )
    if not path.exists():
        raise ImageLoadError(f"{path}: file not found; check the path (relative paths are relative to the launch directory).")
    if path.is_dir():
        raise ImageLoadError(f"{path}: is a directory, not an image file; pass image files (e.g. {path}/*.png).")
    try:
        with Image.open(path) as img:
            frames = getattr(img, "n_frames", 1)
            img.load()  # decode now: truncated/corrupt data fails here, not later
            x, mode_note = pil_to_tensor(img, channels=channels)
            w0, h0 = img.size
    except ImageLoadError as err:
        raise ImageLoadError(f"{path}: {err}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image file PIL can read; pass a PNG, JPEG, BMP, TIFF, GIF or WebP file.") from None
    except Image.DecompressionBombError as err:
        raise ImageLoadError(f"{path}: image too large ({str(err).splitlines()[0]}); downscale it first.") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # truncated or corrupt data
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageLoadError(f"{path}: unreadable image data ({msg}); the file is truncated or corrupt, re-export or re-download it.") from None
    x, size_note = _resize_crop(x, size)
    note = f"{path.name}: {w0}x{h0} {mode_note}" + (f" (first of {frames} frames)" if frames > 1 else "")
    note += f", {size_note} -> ({channels}, {size[0]}, {size[1]})"
    log.info("%s", note)
    return x, note


def load_images(paths: Sequence[str | os.PathLike[str]], *, channels: int, size: int | Sequence[int]) -> LoadedImages:
    """Load many image files; bad files are reported, not raised, so the good ones are kept.

    Args:
        paths: (N,) image files.
        channels: channels the model expects, 1 or 3.
        size: the model's input size, an int (square) or (H, W).
    Returns:
        :class:`LoadedImages` with images (M, C, H, W) of the M readable files (input order),
        their paths and notes, and (path, one-line message) for each of the N - M others.
    Raises:
        ImageLoadError: only for a bad ``size`` or ``channels`` (which no file can fix).
    """
    hw = _size_hw(size)
    if channels not in SUPPORTED_CHANNELS:
        raise ImageLoadError(
            f"the model expects {channels}-channel images but image files can only be converted to 1 or 3 channels; "
            "use a 1- or 3-channel model or pass tensors to the library."
        )
    out = LoadedImages(images=torch.empty(0, channels, *hw))
    good = []
    for p in paths:
        p = Path(p)
        try:
            x, note = _load(p, channels=channels, size=hw)
        except ImageLoadError as err:
            out.failures.append((p, str(err)))
            continue
        good.append(x)
        out.paths.append(p)
        out.notes.append(note)
    if good:
        out.images = torch.stack(good)  # (M, C, H, W)
    return out
