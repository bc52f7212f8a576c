"""Shared LightningDataModule plumbing: subsets, fixed validation subset, deterministic order."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A user-facing data problem (missing or corrupt files, bad options)."""


class EpochShuffleSampler(Sampler[int]):
    """Random order that depends only on (seed, epoch), so a resumed run sees the same batches.

    Lightning calls ``set_epoch`` at every epoch start (and after restoring a checkpoint).
    """

    def __init__(self, n: int, *, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def fixed_subset(dataset: Dataset, limit: int | None, *, seed: int) -> Dataset:
    """The first ``limit`` items of a permutation fixed by ``seed`` (all items when limit is None)."""
    if limit is None or limit >= len(dataset):
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
    return Subset(dataset, idx.tolist())


class BaseImageDataModule(pl.LightningDataModule):
    """Common options of every data module; subclasses implement :meth:`_make_datasets`.

    Images come out as float tensors in [0, 1], (B, C, H, W) after batching; models normalize.
    """

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
        shuffle_seed: int = 0,
        augment: bool = True,
        pin_memory: bool = False,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise DataError(f"data.batch_size must be > 0, got {batch_size}.")
        for name, v in (("limit_train", limit_train), ("limit_val", limit_val), ("limit_test", limit_test)):
            if v is not None and v <= 0:
                raise DataError(f"data.{name} must be a positive number of images or null, got {v}.")
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.limit_train, self.limit_val, self.limit_test = limit_train, limit_val, limit_test
        self.val_seed, self.shuffle_seed = val_seed, shuffle_seed
        self.augment = augment
        self.pin_memory = pin_memory
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.mean, self.std = list(mean), list(std)
        self.class_names = list(class_names) if class_names else None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # -- subclass API --------------------------------------------------------------------
    def _make_datasets(self) -> tuple[Dataset, Dataset, int]:
        """Return (train, test, number of classes found)."""
        raise NotImplementedError

    # -- Lightning API -------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.test_set is not None:
            return
        train, test, found = self._make_datasets()
        if found != self.num_classes:
            raise DataError(
                f"the dataset at '{self.root}' has {found} classes but data.num_classes={self.num_classes}; fix one of them."
            )
        self.train_set = fixed_subset(train, self.limit_train, seed=self.val_seed + 1)
        self.val_set = fixed_subset(test, self.limit_val, seed=self.val_seed)
        self.test_set = fixed_subset(test, self.limit_test, seed=self.val_seed + 2)
        log.info(
            "%s: %d train, %d val, %d test images",
            type(self).__name__,
            len(self.train_set),
            len(self.val_set),
            len(self.test_set),
        )

    def _loader(self, ds: Dataset, *, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return self._loader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(self.train_set), seed=self.shuffle_seed),
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return self._loader(self.val_set, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        assert self.test_set is not None
        return self._loader(self.test_set, batch_size=self.eval_batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"shuffle_seed": self.shuffle_seed}
