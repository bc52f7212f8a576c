"""Shared LightningDataModule plumbing: options, fixed subsets, deterministic shuffling, loaders."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from robustx.robustness.fixed_radius import ROBUSTBENCH_CIFAR10, check_threat_model

log = logging.getLogger(__name__)

STAGES = (None, "fit", "validate", "test", "predict")


class DataError(ValueError):
    """A user-facing data problem (missing or corrupt files, bad options); the message is one line."""


def cache_root() -> Path:
    """``$ROBUSTX_CACHE`` if set, else ``~/.cache/robustx`` (nothing is created here)."""
    return Path(os.environ.get("ROBUSTX_CACHE") or "~/.cache/robustx").expanduser()


def default_cache_dir(name: str) -> Path:
    """Where a dataset called ``name`` keeps extracted archives and decoded arrays."""
    return cache_root() / "datasets" / name


class EpochShuffleSampler(Sampler[int]):
    """A random order that depends only on (seed, epoch), so a resumed run sees the same batches.

    Lightning calls ``set_epoch`` at the start of every epoch (also after restoring a checkpoint).
    """

    def __init__(self, n: int, *, seed: int) -> None:
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def fixed_subset(dataset: Dataset, limit: int | None, *, seed: int) -> Dataset:
    """The first ``limit`` items of a permutation fixed by ``seed`` (sorted); everything if limit is None."""
    n = len(dataset)  # type: ignore[arg-type]
    if limit is None or limit >= n:
        if limit is not None:
            log.info("limit %d >= dataset size %d: using all of it", limit, n)
        return dataset
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:limit]
    return Subset(dataset, sorted(idx.tolist()))


class BaseImageDataModule(pl.LightningDataModule):
    """Options shared by every data module; subclasses implement :meth:`_build_split`.

    Images come out as float tensors in [0, 1], (B, C, H, W) after batching; models normalize
    with ``mean``/``std`` themselves (these are metadata for the rest of the project).

    Args:
        root: where the dataset is (meaning depends on the subclass).
        batch_size: training batch size; ``eval_batch_size`` (default: batch_size) for val/test.
        num_workers: DataLoader worker processes (persistent when > 0).
        limit_train: use only the first N images of a fixed (seeded) permutation of the train set.
        limit_val: validation = N images of the test split drawn with ``val_seed`` (all if None).
        limit_test: test = N images of the test split (all if None).
        val_seed: seed of the validation (and limit_train / limit_test) subsets.
        shuffle_seed: seed of the training order; None uses Lightning's global seed
            (``pl.seed_everything``) if one was set, else an unseeded shuffle.
        pin_memory: DataLoader ``pin_memory``.
        augment: training augmentation on/off (what it is depends on the subclass).
        num_classes, in_channels, image_size, mean, std, class_names: dataset metadata; the
            class count found on disk must equal ``num_classes``.
        cache_dir: where extracted archives / decoded arrays / downloads go (modules that need
            it); default ``~/.cache/robustx/datasets/<name>`` (``$ROBUSTX_CACHE`` replaces
            ``~/.cache/robustx``).
        threat_models: the fixed-radius threat models eval.py reports for this dataset,
            ``[{"norm": "L2" | "Linf", "eps": radius}, ...]``; default RobustBench's CIFAR-10
            ones (robustx.robustness.fixed_radius.ROBUSTBENCH_CIFAR10).
    """

    cache_name = "dataset"

    def __init__(
        self,
        *,
        root: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        val_seed: int = 1776,
        shuffle_seed: int | None = None,
        pin_memory: bool = False,
        augment: bool = True,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        image_size: int = 32,
        class_names: Sequence[str] | None = None,
        cache_dir: str | None = None,
        threat_models: Sequence[dict] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if int(batch_size) <= 0:
            raise DataError(f"data.batch_size must be > 0, got {batch_size}; set a positive batch size.")
        if eval_batch_size is not None and int(eval_batch_size) <= 0:
            raise DataError(f"data.eval_batch_size must be > 0 or null, got {eval_batch_size}; set a positive number or null.")
        if int(num_workers) < 0:
            raise DataError(f"data.num_workers must be >= 0, got {num_workers}.")
        for name, v in (("limit_train", limit_train), ("limit_val", limit_val), ("limit_test", limit_test)):
            if v is not None and int(v) <= 0:
                raise DataError(f"data.{name} must be a positive number of images or null, got {v}.")
        if int(num_classes) <= 0:
            raise DataError(f"data.num_classes must be > 0, got {num_classes}.")
        if int(in_channels) not in (1, 3):
            raise DataError(f"data.in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels}.")
        if int(image_size) <= 0:
            raise DataError(f"data.image_size must be > 0, got {image_size}.")
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if len(mean) not in (1, int(in_channels)) or len(std) != len(mean) or min(std) <= 0:
            raise DataError(
                f"data.mean {mean} and data.std {std} must have 1 or in_channels={in_channels} values each (std > 0)."
            )
        if class_names is not None and len(class_names) != int(num_classes):
            raise DataError(
                f"data.class_names has {len(class_names)} names but data.num_classes={num_classes}; make them agree or set class_names=null."
            )
        self.root = None if root is None else str(root)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        self.num_workers = int(num_workers)
        self.limit_train = None if limit_train is None else int(limit_train)
        self.limit_val = None if limit_val is None else int(limit_val)
        self.limit_test = None if limit_test is None else int(limit_test)
        self.val_seed = int(val_seed)
        self.shuffle_seed = None if shuffle_seed is None else int(shuffle_seed)
        self.pin_memory = bool(pin_memory)
        self.augment = bool(augment)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.mean, self.std = mean, std
        self.image_size = int(image_size)
        self.class_names = [str(c) for c in class_names] if class_names is not None else None
        self.threat_models = [dict(t) for t in (threat_models if threat_models is not None else ROBUSTBENCH_CIFAR10)]
        for t in self.threat_models:
            if set(t) != {"norm", "eps"}:
                raise DataError(f"data.threat_models entries are {{norm, eps}}, got {dict(t)}.")
            try:
                check_threat_model(t["norm"], t["eps"], "quick")
            except ValueError as err:
                raise DataError(f"data.threat_models: {err}") from None
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir(self.cache_name)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._splits: dict[str, Dataset] = {}

    # -- subclass API ---------------------------------------------------------------------
    def _build_split(self, split: str) -> tuple[Dataset, int]:
        """Return the whole stored ``split`` (see :meth:`_source_split`) and its number of classes."""
        raise NotImplementedError

    def _source_split(self, split: str) -> str:
        """Which stored split backs ``split``: by default validation draws from the test split."""
        return "test" if split == "val" else split

    def _where(self) -> str:
        """The data's location, for error messages."""
        return f"'{self.root}'"

    # -- helpers --------------------------------------------------------------------------
    def _split(self, split: str) -> Dataset:
        split = self._source_split(split)
        if split not in self._splits:
            ds, found = self._build_split(split)
            if found != self.num_classes:
                raise DataError(
                    f"the {split} data at {self._where()} has {found} classes but data.num_classes={self.num_classes}; "
                    "fix data.num_classes or the dataset."
                )
            if len(ds) == 0:  # type: ignore[arg-type]
                raise DataError(f"the {split} data at {self._where()} is empty; point data.root at a dataset with images.")
            self._splits[split] = ds
        return self._splits[split]

    # -- Lightning API --------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage not in STAGES:
            raise DataError(f"unknown stage {stage!r}; expected one of fit, validate, test, predict or None.")
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = fixed_subset(self._split("train"), self.limit_train, seed=self.val_seed + 1)
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = fixed_subset(self._split("val"), self.limit_val, seed=self.val_seed)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = fixed_subset(self._split("test"), self.limit_test, seed=self.val_seed + 2)
        log.info(
            "%s (%s): train=%s val=%s test=%s images",
            type(self).__name__,
            stage,
            *(None if s is None else len(s) for s in (self.train_set, self.val_set, self.test_set)),  # type: ignore[arg-type]
        )

    def _loader(self, ds: Dataset | None, name: str, **kwargs) -> DataLoader:
        if ds is None:
            raise RuntimeError(f"{type(self).__name__}.{name}_dataloader() called before setup(); call setup() first.")
        return DataLoader(
            ds,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
            **kwargs,
        )

    def _shuffle_seed(self) -> int | None:
        if self.shuffle_seed is not None:
            return self.shuffle_seed
        env = os.environ.get("PL_GLOBAL_SEED")  # set by pl.seed_everything
        return int(env) if env not in (None, "") else None

    def train_dataloader(self) -> DataLoader:
        seed = self._shuffle_seed()
        if self.train_set is not None and seed is not None:
            sampler = EpochShuffleSampler(len(self.train_set), seed=seed)  # type: ignore[arg-type]
            return self._loader(self.train_set, "train", batch_size=self.batch_size, sampler=sampler)
        return self._loader(self.train_set, "train", batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "val", batch_size=self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", batch_size=self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
