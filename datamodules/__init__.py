"""LightningDataModules (torchvision underneath). Images are float [0, 1] NCHW; models normalize."""

from .base import BaseImageDataModule, DataError, EpochShuffleSampler
from .cifar10 import CIFAR10DataModule
from .fashion_mnist import FashionMNISTDataModule
from .imagefolder import ImageFolderDataModule, ImageNetDataModule
from .tensor_dataset import PadCropFlip, UInt8ImageDataset

__all__ = [
    "BaseImageDataModule",
    "CIFAR10DataModule",
    "DataError",
    "EpochShuffleSampler",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "PadCropFlip",
    "UInt8ImageDataset",
]
