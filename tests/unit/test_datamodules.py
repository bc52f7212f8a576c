"""Data modules: real Fashion-MNIST / CIFAR-10 copies from ../shared/datasets, plus tiny generated trees."""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import (
    CIFAR10DataModule,
    DataError,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    ImageNetDataModule,
)
from datamodules import cache as cache_mod
from datamodules import cifar10 as cifar_mod
from datamodules import fashion_mnist as fmnist_mod
from datamodules.cifar10 import CIFAR10_CLASSES
from datamodules.tensor_dataset import PadCropFlip

from tests.helpers import FMNIST_FILES, needs_fmnist
from tests.paths import DATASETS, FMNIST

CIFAR_JPEG = DATASETS / "cifar10-jpeg"

needs_cifar = pytest.mark.skipif(
    not ((CIFAR_JPEG / "train.tar.gz").is_file() and (CIFAR_JPEG / "test.tar.gz").is_file()),
    reason=f"CIFAR-10 JPEG tarballs not found in {CIFAR_JPEG}",
)


pytestmark = pytest.mark.usefixtures("isolated_data")  # conftest.py: own dataset cache, no global Lightning seed


def _all(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def _assert_one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


# -- Fashion-MNIST ----------------------------------------------------------------------------


@needs_fmnist
def test_fmnist_shapes_dtype_range_labels():
    dm = FashionMNISTDataModule(root=str(FMNIST), batch_size=64, limit_train=1000, limit_val=500)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 28)
    assert dm.augment is False and len(dm.class_names) == 10 and dm.hparams["limit_val"] == 500
    dm.setup("fit")
    assert len(dm.train_set) == 1000 and len(dm.val_set) == 500 and dm.test_set is None
    loader = dm.train_dataloader()
    assert loader.batch_size == 64 and loader.drop_last is False and not loader.persistent_workers
    x, y = next(iter(loader))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.9
    dm.setup("test")
    assert len(dm.test_set) == 10_000
    _, y_test = _all(dm.test_dataloader())
    assert torch.bincount(y_test).tolist() == [1000] * 10  # the real test split is balanced
    assert dm.val_dataloader().batch_size == 64  # eval_batch_size defaults to batch_size


@needs_fmnist
def test_fmnist_val_subset_fixed_across_instances_and_batch_sizes():
    a = FashionMNISTDataModule(root=str(FMNIST), batch_size=32, limit_val=300)
    b = FashionMNISTDataModule(root=str(FMNIST), batch_size=128, eval_batch_size=7, limit_val=300)
    a.setup("validate")
    b.setup("validate")
    assert a.train_set is None and a.test_set is None
    xa, ya = _all(a.val_dataloader())
    xb, yb = _all(b.val_dataloader())
    assert len(ya) == 300 and torch.equal(xa, xb) and torch.equal(ya, yb)
    c = FashionMNISTDataModule(root=str(FMNIST), limit_val=300, val_seed=7)
    c.setup("validate")
    assert not torch.equal(_all(c.val_dataloader())[1], ya)  # another seed, another subset


@needs_fmnist
def test_fmnist_limit_train_and_seeded_shuffle(monkeypatch):
    a = FashionMNISTDataModule(root=str(FMNIST), limit_train=200, batch_size=200, shuffle_seed=5)
    b = FashionMNISTDataModule(root=str(FMNIST), limit_train=200, batch_size=200, shuffle_seed=5)
    a.setup("fit")
    b.setup("fit")
    la, lb = a.train_dataloader(), b.train_dataloader()
    ya, yb = next(iter(la))[1], next(iter(lb))[1]
    assert torch.equal(ya, yb)  # same subset, same order
    la.sampler.set_epoch(1)
    y1 = next(iter(la))[1]
    assert not torch.equal(ya, y1) and torch.equal(ya.sort().values, y1.sort().values)  # reshuffled
    monkeypatch.setenv("PL_GLOBAL_SEED", "11")  # what pl.seed_everything(11) sets
    c = FashionMNISTDataModule(root=str(FMNIST), limit_train=200)
    c.setup("fit")
    assert c.train_dataloader().sampler.seed == 11


@needs_fmnist
def test_fmnist_layouts_fallback_and_augment(tmp_path, monkeypatch):
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"  # torchvision's layout, uncompressed files
    raw.mkdir(parents=True)
    for f in FMNIST_FILES[2:]:
        (raw / f).write_bytes(gzip.decompress((FMNIST / f"{f}.gz").read_bytes()))
    for f in FMNIST_FILES[:2]:
        (raw / f"{f}.gz").symlink_to(FMNIST / f"{f}.gz")
    dm = FashionMNISTDataModule(root=str(tmp_path / "tv"), limit_test=50)
    dm.setup("test")
    ref = FashionMNISTDataModule(root=str(FMNIST), limit_test=50)
    ref.setup("test")
    assert torch.equal(_all(dm.test_dataloader())[0], _all(ref.test_dataloader())[0])

    monkeypatch.setattr(fmnist_mod, "DEBIAN_DIR", str(FMNIST))  # root null -> Debian's copy
    dm = FashionMNISTDataModule(root=None, download=False, limit_test=10)
    dm.setup("test")
    assert len(dm.test_set) == 10
    with pytest.raises(DataError):  # an explicit root is not silently replaced by Debian's copy
        FashionMNISTDataModule(root=str(tmp_path / "nothing"), download=False).setup("test")

    aug = FashionMNISTDataModule(root=str(FMNIST), augment=True, limit_train=1)
    aug.setup("fit")
    draws = torch.stack([aug.train_set[0][0] for _ in range(20)])
    assert draws.shape == (20, 1, 28, 28) and len(torch.unique(draws, dim=0)) > 1


@needs_fmnist
@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad_header"])
def test_fmnist_corrupt_file_names_it(tmp_path, damage):
    for f in FMNIST_FILES:
        (tmp_path / f"{f}.gz").symlink_to(FMNIST / f"{f}.gz")
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.unlink()
    good = (FMNIST / bad.name).read_bytes()
    if damage == "truncate":
        bad.write_bytes(good[: len(good) // 3])
    elif damage == "garbage":
        bad.write_bytes(b"this is not gzip at all" * 10)
    else:
        bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 64))  # 1-d, not images
    dm = FashionMNISTDataModule(root=str(tmp_path), download=False)
    with pytest.raises(DataError) as err:
        dm.setup("test")
    assert str(bad) in _assert_one_line(err)


@pytest.mark.parametrize("root", [None, "missing"])
def test_fmnist_missing_everywhere(tmp_path, monkeypatch, root):
    monkeypatch.setattr(fmnist_mod, "DEBIAN_DIR", str(tmp_path / "no-debian"))
    dm = FashionMNISTDataModule(root=root and str(tmp_path / root), download=False)
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    msg = _assert_one_line(err)
    assert "data.root" in msg and "apt-get install dataset-fashion-mnist" in msg and "data.download=true" in msg


def test_fmnist_failed_download_leaves_nothing(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: <urlopen error [Errno -3] name resolution>")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DataError) as err:
        FashionMNISTDataModule(root=str(tmp_path / "new" / "fmnist")).setup("test")
    assert "a download to" in _assert_one_line(err)
    assert not (tmp_path / "new").exists()


def test_option_validation(tmp_path):
    for bad in ({"batch_size": 0}, {"limit_val": 0}, {"limit_train": -3}, {"eval_batch_size": 0}, {"class_names": ["a"]}):
        with pytest.raises(DataError):
            FashionMNISTDataModule(root=str(tmp_path), **bad)
    with pytest.raises(DataError):
        FashionMNISTDataModule(root=str(tmp_path), in_channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(DataError):
        CIFAR10DataModule(root=str(tmp_path), image_size=64)
    assert not (tmp_path / "robustx-cache").exists()  # constructing creates nothing


# -- tiny generated datasets ---------------------------------------------------------------------

CLASS_COLOR = {c: ((37 * i) % 256, (91 * i + 40) % 256, (53 * i + 200) % 256) for i, c in enumerate(CIFAR10_CLASSES)}


def make_tree(root: Path, classes, counts: dict[str, int], size=32, ext=".jpg", varied=True) -> Path:
    """root/<split>/<class>/NNNN<ext>: each class a solid colour plus a small varying square."""
    for split, n in counts.items():
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                arr = np.empty((size, size, 3), np.uint8)
                arr[:] = CLASS_COLOR.get(cls, (120, 60, 30))
                if varied:
                    arr[k % 8 : k % 8 + 6, 2:9] = 255  # asymmetric patch: flips and crops change the image
                Image.fromarray(arr).save(d / f"{k:04d}{ext}")
    return root


def make_tar(tar_path: Path, src: Path, arcname: str) -> Path:
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(src, arcname=arcname)
    return tar_path


def _color(x: torch.Tensor) -> np.ndarray:
    return (x[:, 20:, 20:].mean(dim=(1, 2)) * 255).numpy()  # away from the patch


# -- CIFAR-10 --------------------------------------------------------------------------------------


def test_cifar_single_tarball_extracts_once_and_caches(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "src", list(reversed(CIFAR10_CLASSES)), {"train": 3, "test": 2})
    tar = make_tar(tmp_path / "cifar10-mini.tar.gz", tree, "cifar10-mini")
    dm = CIFAR10DataModule(root=str(tar), batch_size=8)
    assert dm.cache_dir == tmp_path / "robustx-cache" / "datasets" / "cifar10"  # $ROBUSTX_CACHE
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 20, 20)
    x, y = _all(dm.test_dataloader())
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.tolist() == sorted(y.tolist())
    for xi, yi in zip(x, y):  # labels follow the CIFAR-10 order, by folder name
        assert np.abs(_color(xi) - CLASS_COLOR[CIFAR10_CLASSES[yi]]).max() < 8
    (src_cache,) = dm.cache_dir.iterdir()
    assert (src_cache / "extracted" / cache_mod.MARKER).is_file()
    assert {p.name for p in src_cache.glob("*.npy")} == {"train_x.npy", "train_y.npy", "test_x.npy", "test_y.npy"}

    def boom(*a, **k):
        raise AssertionError("should have used the cache")

    monkeypatch.setattr(cifar_mod, "extract_once", boom)
    monkeypatch.setattr(cifar_mod, "decode_tree", boom)
    again = CIFAR10DataModule(root=str(tar))
    again.setup()
    assert torch.equal(_all(again.test_dataloader())[0], x)


def test_cifar_split_tarballs_and_imagefolder_tree(tmp_path):
    tree = make_tree(tmp_path / "tree", CIFAR10_CLASSES, {"train": 2, "test": 2}, ext=".png")
    tars = tmp_path / "tars"
    tars.mkdir()
    make_tar(tars / "train.tar.gz", tree / "train", "train")
    make_tar(tars / "test.tar.gz", tree / "test", "test")
    from_tars = CIFAR10DataModule(root=str(tars), cache_dir=str(tmp_path / "c1"), augment=False)
    from_tree = CIFAR10DataModule(root=str(tree), cache_dir=str(tmp_path / "c2"), augment=False)
    for dm in (from_tars, from_tree):
        dm.setup("fit")
        assert len(dm.train_set) == 20 and len(dm.val_set) == 20 and dm.test_set is None
    xa, ya = _all(from_tars.val_dataloader())
    xb, yb = _all(from_tree.val_dataloader())
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    png = np.array(Image.open(tree / "test" / "bird" / "0001.png"))  # lossless: exact pixels
    i = int(torch.nonzero(yb == 2)[1])
    assert torch.equal((xb[i] * 255).round().to(torch.uint8), torch.from_numpy(png).permute(2, 0, 1))


def test_cifar_augmentation_varies_and_stays_valid(tmp_path):
    tree = make_tree(tmp_path / "tree", CIFAR10_CLASSES, {"train": 1, "test": 1}, ext=".png")
    dm = CIFAR10DataModule(root=str(tree))
    dm.setup("fit")
    torch.manual_seed(0)
    draws = torch.stack([dm.train_set[0][0] for _ in range(40)])
    assert draws.shape == (40, 3, 32, 32) and draws.min() >= 0 and draws.max() <= 1
    assert len(torch.unique(draws, dim=0)) > 10  # crops and flips vary
    plain = dm.val_set[0][0]
    assert torch.equal(plain, dm.val_set[0][0])  # evaluation: no augmentation

    flip = PadCropFlip(0, flip=True)
    outs = {bool(torch.equal(flip(plain), plain.flip(-1))) for _ in range(30)}
    assert outs == {True, False}
    crop = PadCropFlip(4, flip=False)
    padded = torch.nn.functional.pad(plain[None], (4, 4, 4, 4), mode="replicate")[0]
    out = crop(plain)
    assert any(torch.equal(out, padded[:, i : i + 32, j : j + 32]) for i in range(9) for j in range(9))


def test_cifar_errors(tmp_path):
    with pytest.raises(DataError) as err:
        CIFAR10DataModule(root=str(tmp_path / "x")).setup()
    msg = _assert_one_line(err)
    assert "CIFAR-10 not found at" in msg and "ImageFolder tree with train/ and test/" in msg and ".tar.gz" in msg

    (tmp_path / "tv" / "cifar-10-batches-py").mkdir(parents=True)  # torchvision's format, files missing
    with pytest.raises(DataError) as err:
        CIFAR10DataModule(root=str(tmp_path / "tv")).setup("test")
    assert "torchvision format" in _assert_one_line(err)

    wrong = make_tree(tmp_path / "wrong", CIFAR10_CLASSES[:9] + ["cow"], {"train": 1, "test": 1})
    with pytest.raises(DataError) as err:
        CIFAR10DataModule(root=str(wrong)).setup()
    assert "cow" in _assert_one_line(err)

    with pytest.raises(DataError) as err:  # class count vs num_classes
        CIFAR10DataModule(root=str(make_tree(tmp_path / "ok", CIFAR10_CLASSES, {"train": 1, "test": 1})), num_classes=100).setup()
    assert "num_classes=100" in _assert_one_line(err)

    good = make_tar(tmp_path / "good.tar.gz", tmp_path / "ok", "ok")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError) as err:
        CIFAR10DataModule(root=str(cut)).setup("test")
    assert str(cut) in _assert_one_line(err)

    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tf:
        data = b"pwned"
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError) as err:
        CIFAR10DataModule(root=str(evil), cache_dir=str(tmp_path / "c")).setup("test")
    assert "unsafe" in _assert_one_line(err)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not [p for p in (tmp_path / "c").rglob("*") if ".tmp-" in p.name]  # temp dir cleaned up


@needs_cifar
def test_cifar_real_test_split_from_shared_tarball(tmp_path):
    start = time.perf_counter()
    dm = CIFAR10DataModule(root=str(CIFAR_JPEG), cache_dir=str(tmp_path / "c"), limit_test=None, eval_batch_size=1000)
    dm.setup("test")
    first = time.perf_counter() - start
    assert dm.train_set is None and len(dm.test_set) == 10_000
    x, y = _all(dm.test_dataloader())
    assert x.shape == (10_000, 3, 32, 32) and torch.bincount(y).tolist() == [1000] * 10
    assert 0.3 < float(x.mean()) < 0.6 and x.std() > 0.15
    assert not list((tmp_path / "c").glob("train-*"))  # the train archive was not touched
    start = time.perf_counter()
    again = CIFAR10DataModule(root=str(CIFAR_JPEG), cache_dir=str(tmp_path / "c"))
    again.setup("test")
    second = time.perf_counter() - start
    assert torch.equal(again.test_set.images, dm.test_set.images)
    assert second < max(1.0, first / 5), (first, second)
    shutil.rmtree(tmp_path / "c")  # 10,000 extracted files: don't leave them to pytest's tmp dirs


# -- ImageFolder / ImageNet -------------------------------------------------------------------------


@pytest.mark.parametrize("in_channels", [1, 3])
def test_imagefolder_gray_and_rgb(tmp_path, in_channels):
    root = make_tree(tmp_path / "med", ["benign", "malignant", "normal"], {"train": 4, "test": 3}, size=40)
    dm = ImageFolderDataModule(
        root=str(root), num_classes=3, in_channels=in_channels, image_size=16, batch_size=5,
        mean=[0.5] * in_channels, std=[0.2] * in_channels,
    )
    dm.setup()
    assert dm.class_names == ["benign", "malignant", "normal"]
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (12, 9, 9)  # val falls back to test/
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, in_channels, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    xv, yv = _all(dm.val_dataloader())
    assert xv.shape == (9, in_channels, 16, 16) and yv.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(xv, _all(dm.val_dataloader())[0])  # evaluation is deterministic
    draws = torch.stack([dm.train_set[0][0] for _ in range(10)])
    assert len(torch.unique(draws, dim=0)) > 1  # RandomResizedCrop / flip vary


def test_imagefolder_errors_and_imagenet(tmp_path):
    root = make_tree(tmp_path / "three", ["a", "b", "c"], {"train": 1, "val": 1}, size=24, varied=False)
    with pytest.raises(DataError) as err:
        ImageFolderDataModule(root=str(root), num_classes=4, image_size=16).setup("fit")
    assert "3 classes" in _assert_one_line(err) and "num_classes=4" in str(err.value)

    with pytest.raises(DataError) as err:
        ImageFolderDataModule(root=str(tmp_path / "nope"), num_classes=3).setup("fit")
    assert "not found at" in _assert_one_line(err)

    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        ImageFolderDataModule(root=str(empty), num_classes=1).setup("fit")
    _assert_one_line(err)

    shutil.copytree(root / "val", root / "test")
    shutil.rmtree(root / "test" / "c")
    with pytest.raises(DataError) as err:  # val/ and test/ disagree with train/
        ImageFolderDataModule(root=str(root), num_classes=3, image_size=16).setup()
    _assert_one_line(err)

    net = make_tree(tmp_path / "net", ["n01", "n02"], {"train": 1, "val": 1}, size=64)
    with pytest.raises(DataError):
        ImageNetDataModule(root=str(net)).setup("validate")  # 1000 classes expected by default
    dm = ImageNetDataModule(root=str(net), num_classes=2)
    dm.setup()
    assert dm.val_set[0][0].shape == (3, 224, 224) and dm.train_set[0][0].shape == (3, 224, 224)
    assert dm.mean == [0.485, 0.456, 0.406]


def _spoil(root: Path) -> list[Path]:
    """Two bad files in train/: a truncated JPEG (opens, fails to decode) and a text file named .jpg."""
    files = sorted((root / "train").rglob("*.jpg"))
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 3])
    files[4].write_text("not an image\n")
    return [files[1], files[4]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_images_are_named_in_one_line(tmp_path, num_workers):
    from datamodules.imagefolder import BadImageError, open_image

    root = make_tree(tmp_path / "med", ["a", "b"], {"train": 4, "test": 2}, size=40)
    bad = _spoil(root)
    dm = ImageFolderDataModule(root=str(root), num_classes=2, image_size=16, batch_size=8, num_workers=num_workers,
                               augment=False)
    dm.setup("fit")
    with pytest.raises(BadImageError) as err:  # from a worker process too: its traceback is not in the message
        _all(dm.train_dataloader())
    msg = _assert_one_line(err)
    assert any(f"unreadable image '{b}'" in msg for b in bad) and "data.bad_images=skip" in msg and "Traceback" not in msg
    for b, why in zip(bad, ("(?i)truncated", "cannot identify")):  # both kinds are caught, each naming its file
        with pytest.raises(BadImageError, match=why):
            open_image(str(b))


def test_unreadable_images_can_be_skipped(tmp_path, caplog):
    root = make_tree(tmp_path / "med", ["a", "b"], {"train": 4, "test": 2}, size=40)
    bad = _spoil(root)
    dm = ImageFolderDataModule(root=str(root), num_classes=2, image_size=16, batch_size=8, augment=False,
                               bad_images="skip")
    dm.setup("fit")
    x, y = _all(dm.train_dataloader())
    assert x.shape[0] == 8 and len(dm.train_set) == 8  # each bad slot serves the next readable image
    warned = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(warned) == 2 and all(any(str(b) in w for w in warned) for b in bad)
    _all(dm.train_dataloader())
    assert len([r for r in caplog.records if "skipping unreadable image" in r.getMessage()]) == 2  # once per file
    with pytest.raises(DataError, match="data.bad_images must be one of"):
        ImageFolderDataModule(root=str(root), num_classes=2, bad_images="ignore")
