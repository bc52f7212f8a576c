import json
import pickle
import sys

import pytest
import safetensors.torch
import torch

from robustx.io import export
from robustx.io.export import ExportError, load_model, read_metadata, save_model
from robustx.models import PreActResNet, SmallCNN


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _perturb_buffers(model):
    """Give BN statistics (and the activation widths) non-default values so they must round-trip."""
    g = torch.Generator().manual_seed(0)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
        elif name.endswith("running_var"):
            buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
        elif name.endswith(".d"):
            buf.fill_(0.25)
    model.load_state_dict(model.state_dict())  # HalfHuberReLU caches d as a float on load
    return model


CASES = [
    (
        {"_target_": "robustx.models.SmallCNN", "num_classes": 10, "in_channels": 1, "activation": "relu"},
        (4, 1, 28, 28),
    ),
    (
        {"_target_": "robustx.models.PreActResNet", "depth": 20, "activation": "hhrelu", "mean": [0.5, 0.4, 0.3]},
        (4, 3, 32, 32),
    ),
]


@pytest.mark.parametrize("config,shape", CASES, ids=["smallcnn", "preact20-hhrelu"])
def test_round_trip(tmp_path, config, shape):
    torch.manual_seed(0)
    cls = SmallCNN if config["_target_"].endswith("SmallCNN") else PreActResNet
    model = cls(**{k: v for k, v in config.items() if k != "_target_"})
    for p in model.parameters():  # PreActResNet zero-inits residual branches: make them matter
        p.data.add_(torch.randn_like(p) * 0.05)
    _perturb_buffers(model).eval()
    x = torch.rand(shape)
    meta = {"source": "unit-test", "epochs": 3, "notes": {"psi": [0.1, 0.2]}, "flag": True}

    out = save_model(model, tmp_path / "sub" / "m.safetensors", model_config=config, metadata=meta)
    assert out == tmp_path / "sub" / "m.safetensors" and out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["m.safetensors"]  # no temp file left

    loaded, got = load_model(out)
    assert type(loaded) is cls and not loaded.training
    assert set(loaded.state_dict()) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert got["model_config"] == config
    assert got["format"] == "robustx" and got["robustx_version"]
    for k, v in meta.items():
        assert got[k] == v
    assert read_metadata(out) == got
    if config["activation"] == "hhrelu":
        assert loaded.pipe[-3]._d == 0.25  # the HalfHuberReLU width buffer is restored


def test_buffers_are_saved(tmp_path):
    model = PreActResNet(depth=20, activation="hhrelu")
    path = save_model(model, tmp_path / "m.safetensors", model_config={"_target_": "robustx.models.PreActResNet", "depth": 20, "activation": "hhrelu"})
    keys = set(safetensors.torch.load_file(str(path)))
    assert keys == set(model.state_dict())
    assert "input_offset" in keys and any(k.endswith(".d") for k in keys)
    assert any(k.endswith("num_batches_tracked") for k in keys)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = SmallCNN()
    cfg = {"_target_": "robustx.models.SmallCNN"}
    dst = save_model(model, tmp_path / "m.safetensors", model_config=cfg, metadata={"v": 1})
    before = dst.read_bytes()

    import robustx.io.export as export

    def boom(fd):  # the bytes were written; the disk fails before they are durable
        raise OSError("disk full")

    monkeypatch.setattr(export.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(SmallCNN(), dst, model_config=cfg, metadata={"v": 2})
    with pytest.raises(OSError):
        save_model(SmallCNN(), tmp_path / "new.safetensors", model_config=cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert dst.read_bytes() == before


def test_save_rejects_bad_config(tmp_path):
    with pytest.raises(ExportError, match="_target_"):
        save_model(SmallCNN(), tmp_path / "m.safetensors", model_config={"_target_": "os.system"})
    with pytest.raises(ExportError, match="reserved"):
        save_model(SmallCNN(), tmp_path / "m.safetensors", model_config={"_target_": "robustx.models.SmallCNN"}, metadata={"model_config": 1})
    assert list(tmp_path.iterdir()) == []


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ExportError, match="no model file"):
        load_model(tmp_path / "absent.safetensors")
    good = save_model(SmallCNN(), tmp_path / "m.safetensors", model_config={"_target_": "robustx.models.SmallCNN"})
    data = good.read_bytes()
    for name, blob in {"trunc-header": data[:20], "trunc-data": data[: len(data) // 2], "junk": b"\x00" * 64, "empty": b""}.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(ExportError) as info:
            load_model(bad)
        assert "\n" not in str(info.value) and str(bad) in str(info.value)


def _write_raw(path, tensors, metadata):
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def test_missing_model_config(tmp_path):
    path = _write_raw(tmp_path / "m.safetensors", {"w": torch.zeros(2)}, {"format": "robustx"})
    with pytest.raises(ExportError, match="model_config"):
        load_model(path)
    path = _write_raw(tmp_path / "n.safetensors", {"w": torch.zeros(2)}, None)
    with pytest.raises(ExportError, match="model_config"):
        read_metadata(path)


def test_unknown_target_is_never_imported(tmp_path, monkeypatch):
    import os

    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    tensors = SmallCNN().state_dict()
    for target in ("os.system", "robustx_evil_module_xyz.Boom"):
        cfg = json.dumps({"_target_": target, "command": "touch pwned"})
        path = _write_raw(tmp_path / "m.safetensors", tensors, {"format": "robustx", "model_config": cfg})
        with pytest.raises(ExportError, match="cannot build") as info:
            load_model(path)
        assert "\n" not in str(info.value)
    assert calls == [] and "robustx_evil_module_xyz" not in sys.modules
    assert not (tmp_path / "pwned").exists()


def test_key_mismatch(tmp_path):
    model = SmallCNN()
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    tensors["extra.weight"] = torch.zeros(1)
    del tensors["input_offset"]
    cfg = json.dumps({"_target_": "robustx.models.SmallCNN"})
    path = _write_raw(tmp_path / "m.safetensors", tensors, {"model_config": cfg})
    with pytest.raises(ExportError, match="1 missing keys.*input_offset.*1 unexpected keys.*extra.weight"):
        load_model(path)
    loaded, _ = load_model(path, strict=False)
    assert isinstance(loaded, SmallCNN)
    # A shape mismatch is reported as ExportError too.
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    tensors["head.3.bias"] = torch.zeros(3)
    path = _write_raw(tmp_path / "s.safetensors", tensors, {"model_config": cfg})
    with pytest.raises(ExportError, match="has shape \\[3\\] but robustx.models.SmallCNN with this model_config needs \\[10\\]"):
        load_model(path)


def test_load_never_unpickles(tmp_path, monkeypatch):
    model = PreActResNet(depth=20)
    path = save_model(model, tmp_path / "m.safetensors", model_config={"_target_": "robustx.models.PreActResNet", "depth": 20})

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle must not be used")

    class NoUnpickler:
        def __init__(self, *args, **kwargs):
            forbidden()

    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded, meta = load_model(path)
    read_metadata(path)
    assert meta["model_config"]["depth"] == 20
    assert torch.equal(loaded.input_offset, model.input_offset)


def test_half_precision_and_device(tmp_path):
    model = SmallCNN().half()
    path = save_model(model, tmp_path / "m.safetensors", model_config={"_target_": "robustx.models.SmallCNN"})
    loaded, _ = load_model(path, map_location=torch.device("cpu"))
    assert loaded.input_offset.dtype == torch.float16
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_module_has_no_print():
    import inspect

    assert "print(" not in inspect.getsource(export)
