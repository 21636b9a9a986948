"""Dataset loaders (local files only, never downloads) and a minibatch iterator."""

from hbpc.data.batches import minibatches
from hbpc.data.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ImageData,
    load_cifar10,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist,
)
from hbpc.data.errors import CorruptDataFile, DatasetMissing
from hbpc.data.idx import read_idx

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CorruptDataFile",
    "DatasetMissing",
    "ImageData",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "minibatches",
    "read_idx",
]
