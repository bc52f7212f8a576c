import io
import os
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from robustx.io import legacy
from robustx.io.export import load_model
from robustx.layers import HalfHuberReLU
from robustx.io.legacy import (
    LegacyCheckpointError,
    convert_reference_checkpoint,
    import_reference_checkpoint,
    read_reference_checkpoint,
)
from robustx.models import PreActResNet

from tests.paths import SHARED

CKPT_DIR = SHARED / "reference-checkpoints"
CIFAR_TEST = SHARED / "datasets" / "cifar10-jpeg" / "test.tar.gz"
NAMES = ["resnet44-standard", "resnet44-adv-train", "resnet44-robust", "resnet44-all"]
ROBUST = {"resnet44-robust", "resnet44-all"}
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS = 50


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

needs_ckpts = pytest.mark.skipif(not CKPT_DIR.is_dir(), reason=f"reference checkpoints not found at {CKPT_DIR}")


@pytest.fixture(scope="module")
def imported():
    if not CKPT_DIR.is_dir():
        pytest.skip(f"reference checkpoints not found at {CKPT_DIR}")
    return {name: import_reference_checkpoint(CKPT_DIR / f"{name}.pt") for name in NAMES}


@pytest.fixture(scope="module")
def cifar500():
    """The first 50 test images of each class, read straight from the tarball: (x in [0,1] NCHW, y)."""
    if not CIFAR_TEST.is_file():
        pytest.skip(f"CIFAR-10 JPEG test set not found at {CIFAR_TEST}")
    wanted = {f"test/{c}/{i:04d}.jpg": k for k, c in enumerate(CLASSES) for i in range(PER_CLASS)}
    images = {}
    with tarfile.open(CIFAR_TEST, "r:gz") as tf:
        for member in tf:
            if member.name in wanted:
                with Image.open(io.BytesIO(tf.extractfile(member).read())) as im:
                    images[member.name] = np.asarray(im.convert("RGB"), dtype=np.uint8)
    assert len(images) == len(wanted), "missing images in test.tar.gz"
    order = sorted(wanted, key=lambda n: (wanted[n], n))
    x = torch.from_numpy(np.stack([images[n] for n in order])).permute(0, 3, 1, 2).float().div_(255)
    y = torch.tensor([wanted[n] for n in order])
    return x.contiguous(), y


@needs_ckpts
@pytest.mark.parametrize("name", NAMES)
def test_read_reference_checkpoint(name):
    state, opts = read_reference_checkpoint(CKPT_DIR / f"{name}.pt")
    assert len(state) == (306 if name in ROBUST else 263)
    assert all(t.device.type == "cpu" for t in state.values())
    assert opts["arch"] == [32, legacy.PREPROCESS_NAME, [7, 7, 7], [16, 32, 64], 10]
    assert opts["robust_additions"] is (name in ROBUST)
    assert opts["adversarial_training"] is (name in {"resnet44-adv-train", "resnet44-all"})
    assert ("robust_integration" in opts) is (name in ROBUST)
    if name == "resnet44-robust":
        assert opts["robust_integration"] == pytest.approx(251.697, abs=1e-3)


def test_import_builds_matching_models(imported):
    for name, (model, info) in imported.items():
        assert isinstance(model, PreActResNet) and not model.training
        n_d = sum(isinstance(m, HalfHuberReLU) for m in model.modules())
        assert n_d == (43 if name in ROBUST else 0)  # 2 per block x 21 blocks + the final one
        assert len(model.state_dict()) == (306 if name in ROBUST else 263)
        cfg = info["model_config"]
        assert cfg["_target_"] == "robustx.models.PreActResNet" and cfg["depth"] == 44
        assert cfg["activation"] == ("hhrelu" if name in ROBUST else "relu")
        assert cfg["mean"] == [0.4914, 0.4822, 0.4465] and cfg["std"] == [0.247, 0.243, 0.261]
        assert info["source"] == f"{name}.pt"
        assert info["training_options"]["arch"][1] == "__main__.cifar10_preprocess"


def test_accuracy_on_500_cifar10_test_images(imported, cifar500):
    x, y = cifar500
    accs = {}
    with torch.inference_mode():
        for name, (model, _) in imported.items():
            pred = torch.cat([model(xb).argmax(1) for xb in x.split(250)])
            accs[name] = (pred == y).float().mean().item()
    sys.stderr.write(f"\nreference accuracy on {len(y)} CIFAR-10 test images: {accs}\n")
    for name, acc in accs.items():
        assert acc > 0.6, f"{name}: accuracy {acc:.3f}"


def test_converted_file_gives_identical_logits(imported, cifar500, tmp_path):
    x = cifar500[0][::25]  # 20 images, two per class
    for name in ("resnet44-standard", "resnet44-robust"):
        model, info = imported[name]
        dst = convert_reference_checkpoint(CKPT_DIR / f"{name}.pt", tmp_path / f"{name}.safetensors")
        loaded, meta = load_model(dst)
        assert meta["model_config"] == info["model_config"]
        assert meta["source"] == f"{name}.pt"
        assert meta["training_options"] == info["training_options"]
        with torch.inference_mode():
            assert torch.equal(loaded(x), model(x))


@needs_ckpts
def test_cli(tmp_path, capsys):
    src = CKPT_DIR / "resnet44-standard.pt"
    assert legacy.main([str(src), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "resnet44-standard.safetensors").is_file()
    assert "resnet44-standard.safetensors" in capsys.readouterr().out
    assert legacy.main([str(tmp_path / "absent.pt"), "--out", str(tmp_path / "out")]) == 2


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsEval:
    def __reduce__(self):
        return (eval, ("__import__('os').system('true')",))


def _fake_checkpoint(payload):
    return {"model_params": {"w": torch.zeros(2)}, "training_options": {"arch": payload}}


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
def test_malicious_pickle_is_refused(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(_fake_checkpoint(_RunsShell(marker)), path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(LegacyCheckpointError, match=r"refusing to load .*it asks to run '(posix|os)\.system'") as info:
        import_reference_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "never torch.load untrusted files" in msg
    assert not marker.exists()

    torch.save(_fake_checkpoint(_RunsEval()), path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(LegacyCheckpointError, match="'builtins.eval'"):
        read_reference_checkpoint(path)


def test_calling_the_placeholder_is_refused(tmp_path, monkeypatch):
    """A pickle may name __main__.cifar10_preprocess (allowed) but not call it."""
    called = []

    def cifar10_preprocess(*args):
        called.append(args)

    cifar10_preprocess.__module__ = "__main__"
    cifar10_preprocess.__qualname__ = "cifar10_preprocess"
    monkeypatch.setattr(sys.modules["__main__"], "cifar10_preprocess", cifar10_preprocess, raising=False)

    class Calls:
        def __reduce__(self):
            return (cifar10_preprocess, ("payload",))

    path = tmp_path / "calls.pt"
    torch.save(_fake_checkpoint(Calls()), path, _use_new_zipfile_serialization=False)
    with pytest.raises(LegacyCheckpointError, match="asks to call '__main__.cifar10_preprocess'"):
        read_reference_checkpoint(path)
    assert called == []


def test_bad_files(tmp_path):
    with pytest.raises(LegacyCheckpointError, match="no checkpoint at"):
        read_reference_checkpoint(tmp_path / "absent.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(LegacyCheckpointError, match="cannot read") as info:
        read_reference_checkpoint(junk)
    assert "\n" not in str(info.value)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other, _use_new_zipfile_serialization=False)
    with pytest.raises(LegacyCheckpointError, match="not one of the authors' checkpoints"):
        read_reference_checkpoint(other)


@needs_ckpts
def test_truncated_reference_checkpoint(tmp_path):
    data = (CKPT_DIR / "resnet44-standard.pt").read_bytes()
    for cut in (100, len(data) // 2, len(data) - 10):
        bad = tmp_path / "cut.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(LegacyCheckpointError) as info:
            read_reference_checkpoint(bad)
        assert "\n" not in str(info.value)


@needs_ckpts
def test_only_weights_only_loads(monkeypatch):
    real_load = torch.load
    seen = []

    def checked_load(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        assert kwargs.get("weights_only") is True
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked_load)
    read_reference_checkpoint(CKPT_DIR / "resnet44-robust.pt")
    assert seen == [True]
