"""Smoke tests of the two tutorials: a few steps on tiny data, then the CSV, PNG and printed summary."""

import csv
import importlib.util
import re
import struct
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"
OPTIMIZERS = 3  # Newton-CG, SGD, Adam
STEPS = 3


def load(name: str):
    """Import ``examples/<name>.py`` (the file names start with digits, so not importable by name)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def write_idx(path: Path, array: np.ndarray) -> None:
    """A uint8 IDX file: magic 00 00 08 ndim, the sizes as big-endian uint32, then the bytes."""
    path.write_bytes(struct.pack(f">BBBB{array.ndim}I", 0, 0, 8, array.ndim, *array.shape) + array.tobytes())


def fake_fashion_mnist(folder: Path) -> Path:
    """Random 28x28 images in Fashion-MNIST's file layout: 256 for training, 64 for testing."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 256), ("t10k", 64)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    return folder


def check_outputs(out: Path, printed: str) -> None:
    """The curves of three optimizers in CSV and PNG, and one final accuracy per optimizer printed."""
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "curves.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    names = list(dict.fromkeys(row["optimizer"] for row in rows))
    assert len(names) == OPTIMIZERS and names[0].startswith("Newton-CG")
    for name in names:
        steps = [int(row["step"]) for row in rows if row["optimizer"] == name]
        assert steps == [0, 2, STEPS]
    summary = [line for line in printed[printed.index("final test accuracy"):].splitlines()[3:] if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in summary] == names
    for line, name in zip(summary, names):
        cells = line.strip("| ").split(" | ")
        final = [row for row in rows if row["optimizer"] == name][-1]
        assert cells[1:4] == [f"{float(final[k]):.{d}f}" for k, d in
                              (("train_loss", 4), ("test_accuracy", 4), ("train_seconds", 1))]
        assert re.fullmatch(r"\d+\.\d s \(step \d+\)|not reached", cells[4])


def run(example, data_dir: Path, out: Path, *extra) -> None:
    example.main(["--data-dir", str(data_dir), "--steps", str(STEPS), "--eval-every", "2", "--batch-size", "64",
                  "--out", str(out), *extra])


def test_single_layer_compiles_and_trains(examples_on_path, tmp_path, capsys):
    out = tmp_path / "out"
    run(load("01_single_layer"), fake_fashion_mnist(tmp_path / "fashion"), out)
    printed = capsys.readouterr().out
    check_outputs(out, printed)
    assert (out / "curv_logreg.py").is_file()
    assert "falling back" not in printed


def test_sequential_falls_back_to_digits(examples_on_path, tmp_path, capsys):
    out = tmp_path / "out"
    compiled = EXAMPLES / "generated" / "fcnn_fashion_mnist.py"
    run(load("02_sequential"), tmp_path / "missing", out, "--compiled", str(compiled))
    printed = capsys.readouterr().out
    check_outputs(out, printed)
    assert "Fashion-MNIST not found" in printed and "falling back to scikit-learn's 8x8 digits" in printed


def test_laplace_tutorial_on_tiny_data(tmp_path, capsys):
    pytest.importorskip("laplace", reason="needs the laplace extra: python bench/install.py laplace")
    example = load("04_laplace")
    results = example.main(["--data-dir", str(fake_fashion_mnist(tmp_path / "fmnist")), "--steps", "3",
                            "--fit-samples", "96", "--test-samples", "64", "--prior-steps", "5", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert (tmp_path / "out" / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "prior precision" in printed and "Laplace (hbpc, KFLR)" in printed
    for result in results.values():
        assert 0 <= result["ece"] <= 1 and result["count"].sum() == 64
        assert 0 <= result["accuracy"] <= 1 and result["nll"] > 0


def test_gpt_text_tutorial_on_a_tiny_corpus(tmp_path, capsys):
    """Tutorial 5 at tiny sizes: both optimizers' curves in CSV and PNG, finite losses, one table row each."""
    rows = load("05_gpt_text").main(["--steps", "3", "--batch", "2", "--block", "8", "--width", "8", "--layers", "1",
                                     "--max-chars", "4000", "--eval-every", "2", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (tmp_path / "curves.csv").open() as handle:
        saved = list(csv.DictReader(handle))
    assert [(r["optimizer"], int(r["step"])) for r in saved] == [(name, step) for name in ("K-FAC (hbpc)", "Adam (lr 3e-3)")
                                                                 for step in (0, 2, 3)]
    assert all(np.isfinite(float(r["val_loss"])) for r in saved) and len(rows) == len(saved)
    assert printed.count("| K-FAC (hbpc) |") == 1 and printed.count("| Adam (lr 3e-3) |") == 1
