"""A diverging fit (NaN/inf loss, psi overflow, NaN weights) stops in one line or skips the batch; nothing bad is saved."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_modules.robust_classifier as rc
from lightning_modules.robust_classifier import RobustClassifier, TrainingDiverged
from robustx.io.export import ExportError, save_model
from robustx.models import SmallCNN
from robustx.training.adaptive import AdaptivePsi

MODEL = {"_target_": "robustx.models.SmallCNN", "in_channels": 1, "channels": [4, 4, 4], "hidden": 8, "num_classes": 10}


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _poison(monkeypatch, bad_steps: set[int], value: float = math.nan) -> None:
    """Make the training loss ``value`` at the given global steps (as an overflowing step would)."""
    real = rc.training_loss
    calls = {"n": 0}

    def loss(*args, **kwargs):
        out = real(*args, **kwargs)
        step = calls["n"]
        calls["n"] += 1
        if step in bad_steps:
            out.loss = out.loss * value
        return out

    monkeypatch.setattr(rc, "training_loss", loss)


def _fit(tmp_path, module, *, steps: int = 8) -> pl.Trainer:
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ckpt], num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=_loader())
    return trainer


def _finite(path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_loss_stops_before_the_update_and_keeps_the_checkpoints(tmp_path, monkeypatch, value):
    _poison(monkeypatch, {5}, value)
    module = RobustClassifier(model=MODEL, method={"name": "robust", "penalty": True})
    with pytest.raises(TrainingDiverged) as err:
        _fit(tmp_path, module)
    msg = str(err.value)
    assert "\n" not in msg and "diverged at step 5" in msg and "the last good checkpoint is" in msg and "lower optim.lr or method.l_target" in msg
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())  # stopped before the optimizer step
    ckpts = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert ckpts and all(_finite(p) for p in ckpts)
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_skip_drops_the_bad_batches_and_then_stops(tmp_path, monkeypatch):
    _poison(monkeypatch, {1, 3})
    module = RobustClassifier(model=MODEL, on_nonfinite="skip")
    before = [p.detach().clone() for p in module.parameters()]
    seen = []

    class Watch(pl.Callback):  # the weights after each batch: unchanged after a dropped one
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append([p.detach().clone() for p in pl_module.parameters()])

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ckpt, Watch()], num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=_loader())
    # Lightning still counts a dropped batch as a step (its lr schedule too); the weights do not move.
    assert trainer.global_step == 6 and module.nonfinite_in_a_row == 0
    for i, after in enumerate(seen):
        prev = before if i == 0 else seen[i - 1]
        same = all(torch.equal(a, b) for a, b in zip(prev, after))
        assert same == (i in (1, 3)), i
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())
    _poison(monkeypatch, set(range(100)))
    module = RobustClassifier(model=MODEL, on_nonfinite="skip", max_nonfinite_skips=3)
    with pytest.raises(TrainingDiverged, match=r"\(4 batches in a row\)"):
        _fit(tmp_path / "b", module)


def test_psi_overflow_is_inf_and_stops_the_fit(tmp_path):
    psi = AdaptivePsi(integral=1e6)
    assert psi.psi == math.inf
    psi.update(float("nan"))  # a NaN cross-entropy leaves the controller as it is
    assert psi.integral == 1e6
    module = RobustClassifier(model=MODEL, method={"name": "robust", "penalty": True})
    module.psi.integral = 1e6
    with pytest.raises(TrainingDiverged, match="psi inf"):
        _fit(tmp_path, module)
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").glob("*.ckpt"))


def test_nan_weights_are_never_checkpointed_or_exported(tmp_path):
    module = RobustClassifier(model=MODEL)
    trainer = _fit(tmp_path, module, steps=2)
    good = (tmp_path / "ckpt" / "last.ckpt").read_bytes()
    with torch.no_grad():
        next(module.model.parameters())[0] = math.nan
    with pytest.raises(TrainingDiverged, match="weights became non-finite"):
        trainer.save_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert (tmp_path / "ckpt" / "last.ckpt").read_bytes() == good
    with pytest.raises(ExportError, match="hold NaN/inf"):
        save_model(module.model, tmp_path / "m.safetensors", model_config=MODEL)
    assert not (tmp_path / "m.safetensors").exists()
    save_model(SmallCNN(in_channels=1, channels=(4, 4, 4), hidden=8), tmp_path / "ok.safetensors", model_config=MODEL)


def test_bad_settings_are_one_line():
    with pytest.raises(ValueError, match="on_nonfinite='ignore' is not one of"):
        RobustClassifier(model=MODEL, on_nonfinite="ignore")
    with pytest.raises(ValueError, match="max_nonfinite_skips must be an integer >= 1"):
        RobustClassifier(model=MODEL, max_nonfinite_skips=0)
