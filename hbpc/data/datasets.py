"""Image-classification datasets as float32 tensors; nothing is ever downloaded.

Every loader returns ``ImageData(images, labels)``: ``images`` float32 of shape
``(N, C, H, W)`` scaled to ``[0, 1]`` (optionally normalised per channel as
``(x - mean) / std``), ``labels`` int64 of shape ``(N,)``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from hbpc.data.errors import CorruptDataFile, DatasetMissing
from hbpc.data.idx import read_idx

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
MNIST_DIRS = ("/usr/share/datasets/mnist", "~/data/mnist")
CIFAR10_DIRS = ("/usr/share/datasets/cifar10", "~/data/cifar10")

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR10_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)
CIFAR10_PIXELS = 3 * 32 * 32
DIGITS_TRAIN_FRACTION = 0.8

FASHION_MNIST_HINT = "install it with `apt-get install dataset-fashion-mnist`, or pass --data-dir / data_dir=DIR"
MNIST_HINT = "put the MNIST IDX files (.gz or plain) in one of those directories, or pass --data-dir / data_dir=DIR"
CIFAR10_HINT = (
    "download and unpack the 'CIFAR-10 python version' (cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html) and pass --data-dir / data_dir=DIR pointing at "
    f"the folder that holds {CIFAR10_FOLDER}/ (or at {CIFAR10_FOLDER}/ itself)"
)


class ImageData(NamedTuple):
    """``images``: float32 ``(N, C, H, W)``; ``labels``: int64 ``(N,)``."""

    images: Tensor
    labels: Tensor


def check_split(split: str, splits=("train", "test")) -> None:
    """Raise ``ValueError`` for an unknown split name."""
    if split not in splits:
        raise ValueError(f"split={split!r} is not one of {', '.join(map(repr, splits))}")


def candidate_dirs(data_dir, defaults: tuple[str, ...]) -> list[Path]:
    """``[data_dir]`` if given, else the default locations, with ``~`` expanded."""
    dirs = (data_dir,) if data_dir is not None else defaults
    return [Path(d).expanduser() for d in dirs]


def find_file(directory: Path, name: str) -> Path | None:
    """``directory/name.gz`` or ``directory/name``, whichever exists first."""
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def missing(dataset: str, absent: dict[Path, list[str]], hint: str) -> DatasetMissing:
    """A ``DatasetMissing`` naming, per directory looked in, the files absent there, and what to do."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for directory, files in absent.items():
        groups.setdefault(tuple(files), []).append(str(directory))
    parts = [f"{', '.join(files)} not in {' or '.join(dirs)}" for files, dirs in groups.items()]
    return DatasetMissing(f"{dataset} not found: {'; '.join(parts)}. To fix: {hint}")


def locate_idx(dataset: str, split: str, data_dir, defaults: tuple[str, ...], hint: str) -> tuple[Path, Path]:
    """Paths of the images and labels IDX files of ``split`` in the first directory holding both."""
    check_split(split)
    names = IDX_FILES[split]
    absent = {}
    for directory in candidate_dirs(data_dir, defaults):
        found = [find_file(directory, name) for name in names]
        if all(found):
            return found[0], found[1]
        absent[directory] = [f"{name}[.gz]" for name, path in zip(names, found) if path is None]
    raise missing(dataset, absent, hint)


def images_from_idx(images_path: Path, labels_path: Path) -> ImageData:
    """``(N, 1, H, W)`` images in ``[0, 1]`` and labels from a pair of IDX files."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise CorruptDataFile(
            f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.shape != images.shape[:1]:
        raise CorruptDataFile(
            f"{labels_path}: {labels.shape[0]} labels do not match {images.shape[0]} images in {images_path}"
        )
    x = torch.from_numpy(images).unsqueeze(1).float().div_(255.0)
    return ImageData(x, torch.from_numpy(labels.astype(np.int64)))


def load_fashion_mnist(data_dir=None, split: str = "train") -> ImageData:
    """Fashion-MNIST ``(N, 1, 28, 28)``; default directory ``/usr/share/datasets/fashion-mnist``."""
    paths = locate_idx("Fashion-MNIST", split, data_dir, FASHION_MNIST_DIRS, FASHION_MNIST_HINT)
    return images_from_idx(*paths)


def load_mnist(data_dir=None, split: str = "train") -> ImageData:
    """MNIST ``(N, 1, 28, 28)``; looked for in ``/usr/share/datasets/mnist`` and ``~/data/mnist``."""
    paths = locate_idx("MNIST", split, data_dir, MNIST_DIRS, MNIST_HINT)
    return images_from_idx(*paths)


class ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (all a CIFAR-10 batch holds), never arbitrary objects."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(data (n, 3072) uint8, labels (n,) int64)`` from one CIFAR-10 python batch."""
    try:
        with path.open("rb") as f:
            batch = ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise CorruptDataFile(f"{path}: not a CIFAR-10 python batch ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict):
        raise CorruptDataFile(f"{path}: not a CIFAR-10 python batch (holds a {type(batch).__name__}, not a dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise CorruptDataFile(f"{path}: CIFAR-10 batch lacks 'data' or 'labels' (has {sorted(batch)})")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR10_PIXELS or len(labels) != len(data):
        raise CorruptDataFile(f"{path}: expected uint8 data of shape (n, {CIFAR10_PIXELS}) and n labels, "
                              f"got {data.dtype} {data.shape} and {len(labels)} labels")
    return data, labels


def locate_cifar10(data_dir, names: tuple[str, ...]) -> list[Path]:
    """Paths of the batches ``names`` in ``DIR/cifar-10-batches-py`` or ``DIR`` itself."""
    roots = candidate_dirs(data_dir, CIFAR10_DIRS)
    absent = {}
    for directory in [d / CIFAR10_FOLDER for d in roots] + roots:
        paths = [directory / name for name in names]
        if all(path.is_file() for path in paths):
            return paths
        absent[directory] = [path.name for path in paths if not path.is_file()]
    raise missing("CIFAR-10", absent, CIFAR10_HINT)


def normalize_channels(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``(x - mean[c]) / std[c]`` per channel ``c`` of ``(N, C, H, W)`` images, in place."""
    mean_t = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return images.sub_(mean_t).div_(std_t)


def load_cifar10(data_dir=None, split: str = "train", normalize: bool = False) -> ImageData:
    """CIFAR-10 ``(N, 3, 32, 32)`` from the python batches; ``normalize`` applies the paper's per-channel
    mean ``CIFAR10_MEAN`` and std ``CIFAR10_STD``."""
    check_split(split)
    batches = [read_cifar_batch(path) for path in locate_cifar10(data_dir, CIFAR10_BATCHES[split])]
    data = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    images = torch.from_numpy(data).view(-1, 3, 32, 32).float().div_(255.0)
    if normalize:
        normalize_channels(images, CIFAR10_MEAN, CIFAR10_STD)
    return ImageData(images, torch.from_numpy(labels))


def load_digits(data_dir=None, split: str = "all") -> ImageData:
    """scikit-learn's bundled 8x8 digits, ``(N, 1, 8, 8)`` in ``[0, 1]`` (pixel / 16), 10 classes.

    ``split``: ``"all"`` (1797 images), ``"train"`` (the first 80 %) or ``"test"`` (the rest).
    ``data_dir`` is ignored (the data ships with scikit-learn).
    """
    check_split(split, ("all", "train", "test"))
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:
        raise DatasetMissing("digits: scikit-learn is not installed; `pip install scikit-learn`") from err
    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1).div_(16.0)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    n_train = int(DIGITS_TRAIN_FRACTION * len(labels))
    part = {"all": slice(None), "train": slice(None, n_train), "test": slice(n_train, None)}[split]
    return ImageData(images[part], labels[part])


LOADERS = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "digits": load_digits,
}


def load_dataset(name: str, data_dir=None, split: str = "train", **options) -> ImageData:
    """Load dataset ``name`` (``mnist``, ``fashion-mnist``, ``cifar10``, ``digits``; case, ``_`` and
    ``-`` are ignored, so ``fashion_mnist`` and ``CIFAR-10`` work). ``options`` go to the loader."""
    by_key = {dataset_key(known): loader for known, loader in LOADERS.items()}
    if dataset_key(name) not in by_key:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(LOADERS)}")
    return by_key[dataset_key(name)](data_dir, split, **options)


def dataset_key(name: str) -> str:
    """``name`` lower-cased without ``-`` and ``_``: ``Fashion_MNIST`` -> ``fashionmnist``."""
    return name.lower().replace("-", "").replace("_", "")
