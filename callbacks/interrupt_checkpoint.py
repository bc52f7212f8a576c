"""Write ``interrupted.ckpt`` when a fit dies (Ctrl-C or an exception), to resume from with ``ckpt_path=``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl

from lightning_modules.robust_classifier import TrainingDiverged
from robustx.utils import distributed_failure

log = logging.getLogger(__name__)


class InterruptCheckpoint(pl.Callback):
    """Save a checkpoint when ``trainer.fit`` raises, like Lightning's ``OnExceptionCheckpoint``.

    Not that callback itself: its mere presence makes ``trainer.fit(ckpt_path=None)`` mean
    ``ckpt_path="last"`` (Lightning's checkpoint connector), so a fresh run started in a folder
    that already holds checkpoints silently resumed from them, and every fresh run printed two
    warnings about it. Here a run resumes only from the ``ckpt_path`` the user passes.

    Args:
        dirpath: folder of the checkpoint (created when needed).
        filename: file name without the ``.ckpt`` suffix.
    """

    def __init__(self, dirpath: str, *, filename: str = "interrupted") -> None:
        self.ckpt_path = str(Path(dirpath) / f"{filename}.ckpt")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.global_step == 0:
            return  # nothing trained yet (e.g. the data was not found): nothing to resume
        if isinstance(exception, TrainingDiverged):
            return  # resuming from the diverging step would diverge again: the last good checkpoint is named instead
        if distributed_failure(exception) is not None:
            return  # a peer rank is gone: saving needs its barrier (it would fail again); last.ckpt is the resume point
        # Written atomically (callbacks.checkpoint_io): a failed save leaves no partial file.
        try:
            trainer.save_checkpoint(self.ckpt_path)
        except OSError as err:  # e.g. the disk that just filled up: the original error is the one to report
            log.warning("could not write %s (%s); resume from the last checkpoint instead", self.ckpt_path, err.strerror or err)
            return
        if trainer.is_global_zero:
            log.info("run interrupted (%s); resume with ckpt_path=%s", type(exception).__name__, self.ckpt_path)
