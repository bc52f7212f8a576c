"""Atomic file writes: a reader sees the old file or the complete new one, never half of it."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["DISK_FULL", "atomic_path", "atomic_write", "atomic_write_json"]

#: errno values of a write that ran out of space (device, quota, or a file size limit).
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block succeeds.

    The temporary name is unique per call (``mkstemp``), so DDP ranks or concurrent jobs never
    share one; on an exception it is removed and ``path`` is left as it was. ``mode``: the file's
    permissions (``mkstemp`` makes 0600 files; results and caches are meant to be shared).
    A full disk raises ``OSError`` naming ``path`` (the write itself only knows a file handle).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno in DISK_FULL and err.filename in (None, tmp):
            raise OSError(err.errno, os.strerror(err.errno), str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to ``path`` atomically -> ``path``."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 1, **kwargs: Any) -> Path:
    """``json.dumps(obj, indent=indent, **kwargs)`` written to ``path`` atomically -> ``path``."""
    return atomic_write(path, json.dumps(obj, indent=indent, **kwargs))
