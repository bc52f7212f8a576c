"""InterruptCheckpoint: a crash writes interrupted.ckpt; a fresh fit never resumes from a folder's checkpoints by itself."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks import InterruptCheckpoint


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Crash(pl.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("boom")


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)), batch_size=4)


def _trainer(tmp_path, *callbacks: pl.Callback, epochs: int = 1) -> pl.Trainer:
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[ckpt, InterruptCheckpoint(str(tmp_path / "checkpoints")), *callbacks])


def test_crash_writes_interrupted_checkpoint_and_fresh_fit_starts_fresh(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(tmp_path, Crash(at=3)).fit(Tiny(), _loader())
    path = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert torch.load(path, weights_only=True)["global_step"] == 3
    # A complete epoch in the same folder, then a fresh fit there: it starts at step 0, with no
    # "last"-checkpoint warnings (Lightning's OnExceptionCheckpoint would have resumed from them).
    _trainer(tmp_path).fit(Tiny(), _loader())
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    trainer = _trainer(tmp_path, epochs=1)
    seen = []
    trainer.callbacks.append(type("Spy", (pl.Callback,), {"on_train_start": lambda self, t, m: seen.append(t.global_step)})())
    trainer.fit(Tiny(), _loader())
    assert seen == [0] and trainer.global_step == 8
    # Resuming is explicit: ckpt_path= the interrupted checkpoint continues at step 3.
    resumed = _trainer(tmp_path / "again", epochs=1)
    seen.clear()
    resumed.callbacks.append(type("Spy", (pl.Callback,), {"on_train_start": lambda self, t, m: seen.append(t.global_step)})())
    resumed.fit(Tiny(), _loader(), ckpt_path=str(path), weights_only=True)
    assert seen == [3] and resumed.global_step == 8


def test_nothing_trained_writes_no_checkpoint(tmp_path):
    class CrashAtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            raise RuntimeError("no data")

    with pytest.raises(RuntimeError, match="no data"):
        _trainer(tmp_path, CrashAtStart()).fit(Tiny(), _loader())
    assert not (tmp_path / "checkpoints" / "interrupted.ckpt").exists()
