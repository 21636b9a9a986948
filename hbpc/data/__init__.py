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
from hbpc.data.text import TextCorpus, load_stdlib_text, token_batches

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CorruptDataFile",
    "DatasetMissing",
    "ImageData",
    "TextCorpus",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "load_stdlib_text",
    "minibatches",
    "read_idx",
    "token_batches",
]
