"""Checkpoint writes that survive kills and full disks: a temporary file beside the target, fsync, rename."""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import get_filesystem
from fsspec.implementations.local import LocalFileSystem

from robustx.io.files import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with a same-folder atomic write for local paths.

    Lightning's own "atomic" save writes through an fsspec transaction whose temporary file is in
    the system temp folder and is then moved: across file systems that move is a copy, so a kill
    during it leaves a truncated ``last.ckpt``, and a full ``/tmp`` fails runs whose log folder has
    space. Here the bytes go to a temporary file in the checkpoint's own folder, are fsynced, and
    :func:`os.replace` publishes them: ``path`` is the previous checkpoint or the complete new one,
    also when the disk fills up mid-write (the error names the file). Remote paths keep Lightning's way.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        if storage_options is not None:
            raise TypeError(f"storage_options are not supported by {type(self).__name__} for local paths.")
        buffer = io.BytesIO()  # serialized first (as Lightning does): torch's zip writer hides write errors
        torch.save(checkpoint, buffer)
        with atomic_path(os.fspath(path)) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(buffer.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())  # on disk before the rename publishes it (a power cut keeps the old file)
