"""Malformed exports and Lightning checkpoints (generated here, no blobs committed): refused with one line, before allocating."""

from __future__ import annotations

import json
import resource

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from jobs.loading import CheckpointError, load_classifier
from robustx.io.export import ExportError, load_model, save_model
from robustx.models import SmallCNN

CFG = {"_target_": "robustx.models.SmallCNN", "channels": [8, 8, 8], "hidden": 16}


@pytest.fixture
def export(tmp_path):
    torch.manual_seed(0)
    path = save_model(SmallCNN(channels=(8, 8, 8), hidden=16), tmp_path / "m.safetensors", model_config=CFG)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return path, load_file(str(path)), meta


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("config, message", [
    ({**CFG, "channels": [-1, 8, 8]}, "cannot build"),
    ({**CFG, "hidden": 10**6}, "has shape [16] but"),  # would allocate 4 GB for one layer if built first
    ({**CFG, "channels": [8, 8]}, "cannot build"),
])
def test_export_with_a_config_that_does_not_fit_its_tensors(tmp_path, export, config, message):
    _, tensors, meta = export
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**meta, "model_config": json.dumps(config)})
    before = _max_rss_mb()
    with pytest.raises(ExportError) as err:
        load_model(bad)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert _max_rss_mb() - before < 500  # validated against the header before building


def test_export_with_integer_weights_names_the_dtype(tmp_path, export):
    _, tensors, meta = export
    bad = tmp_path / "int.safetensors"
    save_file({k: v.to(torch.int32) if v.is_floating_point() else v for k, v in tensors.items()}, str(bad), metadata=meta)
    with pytest.raises(ExportError, match="is stored as I32 but the model needs a floating-point tensor"):
        load_model(bad)


def test_lightning_checkpoints_that_are_not_ours(tmp_path):
    model = SmallCNN(channels=(8, 8, 8), hidden=16)
    good = {"model_config": CFG, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    torch.save(good, tmp_path / "good.ckpt")
    loaded, info = load_classifier(tmp_path / "good.ckpt")
    assert info["format"] == "lightning"
    cases = {
        "int": (3, "not written by this project's RobustClassifier"),
        "nokey": ({"state_dict": {}}, "not written by this project's RobustClassifier"),
        "negative": ({**good, "model_config": {**CFG, "hidden": -4}}, "cannot rebuild"),
        "huge": ({**good, "model_config": {**CFG, "hidden": 10**6}}, "do not fit its model_config"),
        "typo": ({**good, "model_config": {**CFG, "hiden": 3}}, "cannot rebuild"),
    }
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / f"{name}.ckpt")
        with pytest.raises(CheckpointError, match=message) as err:
            load_classifier(tmp_path / f"{name}.ckpt")
        assert "\n" not in str(err.value), name


def test_export_with_deeply_nested_metadata_is_one_line(tmp_path, export):
    _, tensors, meta = export
    bad = tmp_path / "deep.safetensors"
    save_file(tensors, str(bad), metadata={**meta, "source": "[" * 200_000 + "]" * 200_000})
    with pytest.raises(ExportError, match="nested too deeply") as err:
        load_model(bad)
    assert "\n" not in str(err.value)
