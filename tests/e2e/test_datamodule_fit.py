"""FashionMNISTDataModule under a Lightning Trainer fit (the data module alone: tests/unit/test_datamodules.py)."""

from __future__ import annotations

import pytest
import torch

from datamodules import FashionMNISTDataModule

from tests.helpers import needs_fmnist
from tests.paths import FMNIST

pytestmark = pytest.mark.usefixtures("isolated_data")  # conftest.py: own dataset cache, no global Lightning seed


@needs_fmnist
def test_fmnist_in_lightning_trainer(tmp_path):
    import pytorch_lightning as pl

    class Linear(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(784, 10)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x.flatten(1)), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x.flatten(1)), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    pl.seed_everything(0)
    dm = FashionMNISTDataModule(root=str(FMNIST), limit_train=256, limit_val=128, batch_size=64, num_workers=1)
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(Linear(), datamodule=dm)
    assert trainer.global_step == 8 and "val_loss" in trainer.callback_metrics
    assert dm.train_dataloader().persistent_workers
