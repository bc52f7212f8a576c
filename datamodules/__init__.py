"""LightningDataModules (torchvision underneath). Images are float [0, 1] NCHW; models normalize."""

from .base import BaseImageDataModule, DataError, EpochShuffleSampler
from .fashion_mnist import FashionMNISTDataModule
from .imagefolder import CIFAR10DataModule, ImageFolderDataModule, ImageNetDataModule

__all__ = [
    "BaseImageDataModule",
    "CIFAR10DataModule",
    "DataError",
    "EpochShuffleSampler",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
]
