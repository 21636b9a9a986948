"""Dataset loaders on tiny synthetic IDX / CIFAR-10 files written to tmp_path."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from hbpc.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CorruptDataFile,
    DatasetMissing,
    load_cifar10,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    minibatches,
    read_idx,
)

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode ``array`` as IDX: magic, big-endian sizes, big-endian data."""
    header = bytes([0, 0, IDX_CODES[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx_pair(directory: Path, prefix: str, images: np.ndarray, labels: np.ndarray, compress: bool) -> None:
    """Write ``{prefix}-images-idx3-ubyte`` and ``{prefix}-labels-idx1-ubyte`` (gzipped if ``compress``)."""
    directory.mkdir(parents=True, exist_ok=True)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        data = idx_bytes(array)
        name = f"{prefix}-{kind}-ubyte"
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)


def tiny_mnist(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    """A CIFAR-10 python batch as the official files store it (bytes keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump({b"batch_label": b"synthetic", b"data": data, b"labels": labels}, f)


def tiny_cifar(directory: Path, n: int = 2) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write all six batches with ``n`` images each; return their contents by file name."""
    rng = np.random.default_rng(0)
    contents = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        write_cifar_batch(directory / name, data, labels)
        contents[name] = (data, labels)
    return contents


# ---- IDX ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(IDX_CODES), ids=lambda t: t.__name__)
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_read_idx_round_trip(tmp_path, dtype, compress):
    array = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
    data = idx_bytes(array)
    path = tmp_path / "x.idx"
    path.write_bytes(gzip.compress(data) if compress else data)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 0))
    with pytest.raises(CorruptDataFile, match="bad IDX magic 12340801"):
        read_idx(path)


def test_read_idx_unknown_type_code(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 0))
    with pytest.raises(CorruptDataFile, match="bad IDX magic"):
        read_idx(path)


@pytest.mark.parametrize(
    "cut, message",
    [(2, "truncated IDX header \\(2 bytes, need at least 4\\)"),
     (9, "truncated IDX header \\(9 bytes, need 16 for 3 dimensions\\)"),
     (-5, "truncated IDX data: shape \\(2, 3, 4\\) of uint8 needs 24 bytes after the header, found 19")],
    ids=["magic", "sizes", "data"],
)
def test_read_idx_truncated(tmp_path, cut, message):
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 3, 4), np.uint8))[:cut]))
    with pytest.raises(CorruptDataFile, match=message):
        read_idx(path)


def test_read_idx_trailing_bytes(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros(3, np.uint8)) + b"\x00")
    with pytest.raises(CorruptDataFile, match="trailing bytes in IDX data"):
        read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path):
    path = tmp_path / "broken.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((5, 5), np.uint8)))[:-12])
    with pytest.raises(CorruptDataFile, match="corrupt gzip stream"):
        read_idx(path)


# ---- MNIST / Fashion-MNIST ---------------------------------------------------------------


@pytest.mark.parametrize("loader", [load_mnist, load_fashion_mnist], ids=["mnist", "fashion-mnist"])
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_mnist_format_loaders_read_exactly(tmp_path, loader, compress):
    train, test = tiny_mnist(5, seed=1), tiny_mnist(3, seed=2)
    write_idx_pair(tmp_path, "train", *train, compress=compress)
    write_idx_pair(tmp_path, "t10k", *test, compress=compress)
    for split, (images, labels) in (("train", train), ("test", test)):
        x, y = loader(tmp_path, split=split)
        assert x.dtype == torch.float32 and x.shape == (len(labels), 1, 28, 28)
        assert y.dtype == torch.int64
        torch.testing.assert_close(x[:, 0], torch.from_numpy(images).float() / 255, rtol=0, atol=0)
        assert y.tolist() == labels.tolist()


def test_mnist_missing_names_files_directory_and_fix(tmp_path):
    write_idx_pair(tmp_path, "train", *tiny_mnist(2, seed=0), compress=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetMissing) as err:
        load_mnist(tmp_path)
    message = str(err.value)
    assert f"train-labels-idx1-ubyte[.gz] not in {tmp_path}" in message
    assert "train-images" not in message
    assert "--data-dir" in message
    assert isinstance(err.value, FileNotFoundError)


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(DatasetMissing, match="apt-get install dataset-fashion-mnist") as err:
        load_fashion_mnist(tmp_path, split="test")
    assert f"t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] not in {tmp_path}" in str(err.value)


def test_mnist_labels_images_mismatch(tmp_path):
    images, labels = tiny_mnist(4, seed=0)
    write_idx_pair(tmp_path, "train", images, labels[:3], compress=False)
    with pytest.raises(CorruptDataFile, match="do not match 4 images"):
        load_mnist(tmp_path)


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="split='valid'"):
        load_mnist(tmp_path, split="valid")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Fashion-MNIST not installed")
def test_installed_fashion_mnist_test_split():
    x, y = load_fashion_mnist(split="test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.bincount(y).tolist() == [1000] * 10


# ---- CIFAR-10 ----------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [True, False], ids=["root-dir", "batches-dir"])
def test_cifar10_reads_exactly(tmp_path, nested):
    batches = tmp_path / "cifar-10-batches-py"
    contents = tiny_cifar(batches)
    x, y = load_cifar10(tmp_path if nested else batches)
    assert x.dtype == torch.float32 and x.shape == (10, 3, 32, 32) and y.dtype == torch.int64
    expected = np.concatenate([contents[f"data_batch_{i}"][0] for i in range(1, 6)])
    torch.testing.assert_close(x, torch.from_numpy(expected).float().reshape(10, 3, 32, 32) / 255, rtol=0, atol=0)
    assert y.tolist() == sum((contents[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    data, labels = contents["test_batch"]
    xt, yt = load_cifar10(tmp_path, split="test")
    assert yt.tolist() == labels
    # channel-major rows: the first 1024 values are the red plane
    torch.testing.assert_close(xt[1, 0].reshape(-1), torch.from_numpy(data[1, :1024]).float() / 255)


def test_cifar10_normalisation(tmp_path):
    tiny_cifar(tmp_path / "cifar-10-batches-py")
    raw = load_cifar10(tmp_path, split="test").images
    normed = load_cifar10(tmp_path, split="test", normalize=True).images
    for c in range(3):
        torch.testing.assert_close(normed[:, c], (raw[:, c] - CIFAR10_MEAN[c]) / CIFAR10_STD[c])


def test_cifar10_missing_batch(tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    tiny_cifar(batches)
    (batches / "data_batch_3").unlink()
    with pytest.raises(DatasetMissing) as err:
        load_cifar10(tmp_path)
    message = str(err.value)
    assert f"data_batch_3 not in {batches}" in message
    assert "cifar-10-python.tar.gz" in message and "--data-dir" in message


@pytest.mark.parametrize(
    "payload, message",
    [(b"not a pickle", "not a CIFAR-10 python batch"),
     (pickle.dumps([1, 2]), "holds a list, not a dict"),
     (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}), "lacks 'data' or 'labels'"),
     (pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}), "expected uint8 data of shape"),
     (pickle.dumps({b"data": Path("x"), b"labels": []}), "refusing to load pathlib")],
    ids=["garbage", "list", "no-labels", "bad-shape", "foreign-object"],
)
def test_cifar10_corrupt_batch(tmp_path, payload, message):
    tiny_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(payload)
    with pytest.raises(CorruptDataFile, match=message):
        load_cifar10(tmp_path, split="test")


# ---- digits, dispatcher, batches ---------------------------------------------------------


def test_digits():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == 0.0 and x.max() == 1.0 and set(y.tolist()) == set(range(10))
    train, test = load_digits(split="train"), load_digits(split="test")
    assert len(train.labels) + len(test.labels) == 1797
    torch.testing.assert_close(torch.cat([train.images, test.images]), x)


def test_load_dataset_dispatch(tmp_path):
    write_idx_pair(tmp_path, "train", *tiny_mnist(3, seed=0), compress=True)
    a = load_dataset("Fashion_MNIST", tmp_path)
    b = load_dataset("mnist", str(tmp_path))
    torch.testing.assert_close(a.images, b.images)
    tiny_cifar(tmp_path / "cifar-10-batches-py")
    assert load_dataset("CIFAR-10", tmp_path, split="test", normalize=True).images.shape == (2, 3, 32, 32)
    assert load_dataset("digits", split="test").images.shape[1:] == (1, 8, 8)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; known: mnist, fashion-mnist, cifar10, digits"):
        load_dataset("imagenet")


def test_minibatches_cover_epoch_reproducibly():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    batches = list(minibatches(x, y, 4, generator=torch.Generator().manual_seed(0)))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == list(range(10))
    for xb, yb in batches:
        assert xb[:, 0].long().tolist() == yb.tolist()
    again = list(minibatches(x, y, 4, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert [len(b[1]) for b in minibatches(x, y, 4, drop_last=True)] == [4, 4]
    assert torch.cat([b[1] for b in minibatches(x, y, 3, shuffle=False)]).tolist() == list(range(10))


def test_minibatches_validate():
    with pytest.raises(ValueError, match="batch_size=0"):
        next(minibatches(torch.zeros(2), torch.zeros(2), 0))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        next(minibatches(torch.zeros(3), torch.zeros(2), 1))
