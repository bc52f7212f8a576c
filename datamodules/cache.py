"""On-disk caches: safe one-time archive extraction and decoded uint8 arrays as .npy (no pickle)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from robustx.io.files import atomic_path
from robustx.utils import one_line

from .base import DataError

log = logging.getLogger(__name__)

MARKER = ".robustx-complete"
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_FILTER_ERROR = getattr(tarfile, "FilterError", tarfile.TarError)  # Python with extraction filters


def is_tarball(path: Path) -> bool:
    return path.name.lower().endswith(TAR_SUFFIXES)


def file_signature(path: Path) -> str:
    """Identity of a source file: resolved path, size and modification time."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def source_dir(cache_dir: Path, source: Path) -> Path:
    """The cache sub-folder for one source (archive or folder), unique per resolved path."""
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:12]
    stem = source.name
    for suffix in TAR_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return cache_dir / f"{stem or 'data'}-{digest}"


def _safe_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    name = PurePosixPath(member.name)
    if name.is_absolute() or member.name.startswith(("/", "\\")) or ".." in name.parts:
        raise DataError(f"unsafe path '{member.name}' in archive; refusing to extract it (use a trusted archive).")
    if hasattr(tarfile, "data_filter"):
        return tarfile.data_filter(member, dest)  # rejects links out of dest, devices, odd modes
    return member if (member.isfile() or member.isdir()) else None  # Python without extraction filters


def extract_once(archive: Path, dest: Path) -> Path:
    """Extract ``archive`` to ``dest`` once: safely, atomically (temp dir + os.replace), marked complete.

    Later calls (and concurrent processes that lose the race) reuse the finished extraction.
    """
    if (dest / MARKER).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache may be shared
    try:
        log.info("extracting %s to %s (once)", archive, dest)
        try:
            with tarfile.open(archive, "r:*") as tf:
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(tmp, filter=_safe_filter)
                else:  # pragma: no cover - Python < 3.10.12 / 3.11.4
                    members = [m for m in tf if _safe_filter(m, str(tmp)) is not None]
                    tf.extractall(tmp, members=members)
        except DataError:
            raise
        except _FILTER_ERROR as err:
            raise DataError(f"unsafe member in archive '{archive}' ({one_line(err)}); use a trusted archive.") from None
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            raise DataError(f"corrupt or unreadable archive '{archive}' ({one_line(err)}); re-download it.") from None
        (tmp / MARKER).write_text(file_signature(archive) + "\n")
        if dest.exists() and not (dest / MARKER).is_file():
            shutil.rmtree(dest)  # a leftover without marker (not ours): replace it
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / MARKER).is_file():  # not a lost race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def arrays_ready(folder: Path, split: str, signature: str) -> bool:
    """Whether a complete cache for ``split`` with this ``signature`` exists (without loading it)."""
    try:
        meta = json.loads((folder / f"{split}_meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("signature") == signature and all((folder / f"{split}_{k}.npy").is_file() for k in "xy")


def load_arrays(folder: Path, split: str, signature: str) -> dict[str, np.ndarray] | None:
    """The cached ``<split>_x.npy``/``<split>_y.npy`` if their metadata matches ``signature``, else None."""
    meta_path = folder / f"{split}_meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("signature") != signature:
            log.info("cache %s is stale for split %s; rebuilding", folder, split)
            return None
        x = np.load(folder / f"{split}_x.npy", allow_pickle=False)
        y = np.load(folder / f"{split}_y.npy", allow_pickle=False)
        if x.dtype != np.uint8 or x.ndim != 4 or len(x) != len(y) or list(x.shape) != meta.get("shape"):
            raise ValueError(f"unexpected arrays {x.dtype} {x.shape} / {y.shape}")
    except (OSError, ValueError, EOFError) as err:
        log.warning("cache %s for split %s is unreadable (%s); rebuilding", folder, split, one_line(err))
        return None
    return {"x": x, "y": y.astype(np.int64, copy=False)}


def save_arrays(folder: Path, split: str, signature: str, x: np.ndarray, y: np.ndarray) -> None:
    """Write arrays (each atomically), then the metadata file that marks them complete."""
    folder.mkdir(parents=True, exist_ok=True)

    def _atomic(name: str, write) -> None:
        with atomic_path(folder / name) as tmp, tmp.open("wb") as f:  # 0644: a cache may be shared
            write(f)

    _atomic(f"{split}_x.npy", lambda f: np.save(f, x, allow_pickle=False))
    _atomic(f"{split}_y.npy", lambda f: np.save(f, y, allow_pickle=False))
    meta = {"signature": signature, "shape": list(x.shape), "format": 1}
    _atomic(f"{split}_meta.json", lambda f: f.write(json.dumps(meta).encode()))
