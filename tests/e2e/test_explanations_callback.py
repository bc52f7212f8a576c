"""AdversarialExplanations callback: PNG grids per epoch, W&B offline media, CSV / no logger, config composition."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from callbacks.adversarial_explanations import AdversarialExplanations
from datamodules.tensor_dataset import UInt8ImageDataset
from robustx.models import SmallCNN

from tests.paths import ROOT

NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = SmallCNN(in_channels=1, channels=(4, 4, 4), hidden=8)

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self.model(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _dataset(n: int, seed: int) -> UInt8ImageDataset:
    g = torch.Generator().manual_seed(seed)
    return UInt8ImageDataset(torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=g), torch.arange(n) % 10)


class TinyData(pl.LightningDataModule):
    class_names = NAMES
    num_classes = 10

    def setup(self, stage: str | None = None) -> None:
        self.train_set, self.val_set = _dataset(32, 0), _dataset(16, 1)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=8)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=8)


def _trainer(tmp_path: Path, logger, callback, epochs: int = 2) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, limit_train_batches=2, limit_val_batches=1, logger=logger, callbacks=[callback],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        accelerator="cpu", devices=1, num_sanity_val_steps=0,
    )


def _valid_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        im.load()
        return im.size


def test_callback_writes_pngs_and_logs_wandb_images_offline(tmp_path, monkeypatch, caplog):
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    caplog.set_level("INFO", logger="callbacks.adversarial_explanations")
    cb = AdversarialExplanations(every_n_epochs=1, num_images=2, steps=3, baselines=["gradcam", "saliency"])
    logger = WandbLogger(project="robustx-test", save_dir=str(tmp_path), offline=True)
    calls = []
    experiment = logger.experiment
    original = experiment.log
    monkeypatch.setattr(experiment, "log", lambda data, *a, **k: (calls.append(data), original(data, *a, **k))[1])
    try:
        _trainer(tmp_path, logger, cb).fit(Tiny(), datamodule=TinyData())
    finally:
        run_dir = Path(experiment.dir).parent
        wandb.finish()
    out = tmp_path / "explanations"
    assert sorted(p.name for p in out.iterdir()) == ["epoch_000.png", "epoch_001.png"]  # final == last periodic step
    w, h = _valid_png(out / "epoch_001.png")
    assert w > h > 0
    grids = [c for c in calls if "explanations/grid" in c]
    assert len(grids) == 2 and all(isinstance(c["explanations/grid"], wandb.Image) for c in grids)
    assert all(c["explanations/seconds"] > 0 for c in grids)
    media = list((run_dir / "files" / "media" / "images").rglob("*.png"))
    assert len(media) == 2
    for m in media:
        _valid_png(m)
    lines = [r.getMessage() for r in caplog.records if r.name == "callbacks.adversarial_explanations"]
    assert len(lines) == 2 and all("2 images x 10 targets + 2 baselines in" in ln and "s/image" in ln for ln in lines)
    assert cb.history[0]["tag"] == "epoch_000" and cb.history[1]["epoch"] == 1


def test_callback_with_csv_logger_no_logger_and_val_dataloader(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    # CSV logger, only at the end of training: final.png and the cost as a metric.
    cb = AdversarialExplanations(every_n_epochs=0, num_images=3, targets=["true", "sandal"], steps=2, baselines=[])
    _trainer(tmp_path / "csv", CSVLogger(str(tmp_path / "csv"), name="csv", version=""), cb, epochs=1).fit(Tiny(), datamodule=TinyData())
    assert sorted(p.name for p in (tmp_path / "csv" / "explanations").iterdir()) == ["final.png"]
    _valid_png(tmp_path / "csv" / "explanations" / "final.png")
    with open(tmp_path / "csv" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("explanations/seconds") for r in rows)

    # No logger, no datamodule (plain dataloaders), predicted class as "true", output_dir set.
    cb = AdversarialExplanations(every_n_epochs=1, num_images=3, steps=2, baselines=["saliency"], use_labels=False,
                                 on_train_end=False, output_dir=str(tmp_path / "plain"))
    dm = TinyData()
    dm.setup()
    _trainer(tmp_path / "none", False, cb, epochs=1).fit(Tiny(), train_dataloaders=dm.train_dataloader(),
                                                         val_dataloaders=dm.val_dataloader())
    _valid_png(tmp_path / "plain" / "explanations" / "epoch_000.png")
    assert not (tmp_path / "none" / "explanations").exists()


def test_callback_argument_errors():
    with pytest.raises(ValueError, match="rho must be > 0"):
        AdversarialExplanations(rho=0)
    with pytest.raises(ValueError, match="unknown baseline"):
        AdversarialExplanations(baselines=["gradcam", "shap"])
    with pytest.raises(ValueError, match="num_images must be > 0"):
        AdversarialExplanations(num_images=0)


def test_callbacks_explanations_config_composes():
    import hydra
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=["callbacks=explanations", "callbacks.adversarial_explanations.every_n_epochs=2"])
    assert {"model_checkpoint", "lr_monitor", "adversarial_explanations"} <= set(cfg.callbacks)
    cb = hydra.utils.instantiate(cfg.callbacks.adversarial_explanations)
    assert isinstance(cb, AdversarialExplanations)
    assert cb.every_n_epochs == 2 and cb.targets == ["true", "second", "all"] and len(cb.baselines) == 5
