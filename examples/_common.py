"""What the two tutorials share: command line, data, the training loop, evaluation, CSV, plot and summary.

Every optimizer trains a copy of the same initial model on the same sequence of minibatches
(shuffled with ``--seed``); evaluations on the full test set happen every ``--eval-every`` steps.
``train_seconds`` counts only the update steps, never the evaluations.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import matplotlib
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter
from torch import Tensor, nn
from tqdm import tqdm

from hbpc.data import DatasetMissing, ImageData, load_digits, load_fashion_mnist, minibatches

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_SIZE = (28, 28)
EVAL_BATCH = 2000
MARKERS = "os^vD"  # one per optimizer, so that overlapping curves stay visible
COLUMNS = ("optimizer", "step", "epoch", "train_loss", "test_loss", "test_accuracy", "train_seconds")


@dataclass
class Run:
    """One optimizer to compare: ``update(x, y)`` takes one step on a batch and returns the loss before it."""

    name: str
    model: nn.Module
    update: Callable[[Tensor, Tensor], float]


def parser(description: str, steps: int, out: str) -> argparse.ArgumentParser:
    """The options both tutorials take."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-dir", default=FASHION_MNIST_DIR,
                   help="folder with the Fashion-MNIST IDX files (default: %(default)s); "
                        "when missing, scikit-learn's digits upsampled to 28x28 are used")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=steps, help="update steps per optimizer (default: %(default)s)")
    length.add_argument("--epochs", type=float, help="train for this many epochs instead of --steps")
    p.add_argument("--batch-size", type=int, default=500, help="training batch size (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=25, help="steps between test evaluations (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the minibatch order; the model file seeds the initial weights (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path(out), help="folder for the CSV and PNG (default: %(default)s)")
    p.add_argument("--target", type=float, default=0.6,
                   help="test accuracy whose first crossing the summary times (default: %(default)s)")
    return p


def load_data(data_dir: str) -> tuple[ImageData, ImageData, str]:
    """``(train, test, name)``: Fashion-MNIST from ``data_dir``, else digits upsampled to 28x28."""
    try:
        return load_fashion_mnist(data_dir, "train"), load_fashion_mnist(data_dir, "test"), "Fashion-MNIST"
    except DatasetMissing as error:
        print(f"note: {error}\nnote: falling back to scikit-learn's 8x8 digits (1437 train / 360 test images), "
              "upsampled bilinearly to 28x28 so that the 784-input model and its compiled curvature module "
              "are used unchanged")
    return upsample(load_digits(split="train")), upsample(load_digits(split="test")), "digits (8x8 upsampled to 28x28)"


def upsample(data: ImageData) -> ImageData:
    """Images resized bilinearly to ``IMAGE_SIZE``."""
    images = nn.functional.interpolate(data.images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    return ImageData(images, data.labels)


def num_steps(args: argparse.Namespace, n_train: int) -> int:
    """``--steps``, or ``--epochs`` converted to steps of full batches."""
    if args.batch_size > n_train:
        raise SystemExit(f"--batch-size {args.batch_size} exceeds the {n_train} training images")
    if args.epochs is None:
        return args.steps
    return max(1, math.ceil(args.epochs * (n_train // args.batch_size)))


def batches(data: ImageData, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless full minibatches, reshuffled every epoch by a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from minibatches(data.images, data.labels, batch_size, generator, drop_last=True)


def adam_steps(model: nn.Module, batches: Iterator[tuple[Tensor, Tensor]], steps: int, lr: float = 1e-3) -> float:
    """``steps`` Adam steps with cross-entropy on ``batches``; returns the last batch loss."""
    adam, loss_fn, loss = torch.optim.Adam(model.parameters(), lr=lr), nn.CrossEntropyLoss(), float("nan")
    for x, y in islice(batches, steps):
        adam.zero_grad()
        batch_loss = loss_fn(model(x), y)
        batch_loss.backward()
        adam.step()
        loss = batch_loss.item()
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, loss_fn: nn.Module) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on all of ``data``."""
    loss, correct = 0.0, 0
    for x, y in minibatches(data.images, data.labels, EVAL_BATCH, shuffle=False):
        logits = model(x)
        loss += loss_fn(logits, y).item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
    return loss / len(data.labels), correct / len(data.labels)


def torch_update(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module):
    """``update(x, y)`` for a first-order torch optimizer: autograd gradient, then ``optimizer.step()``."""
    def update(x: Tensor, y: Tensor) -> float:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()
    return update


def newton_update(curvature, optimizer):
    """``update(x, y)`` for ``NewtonCG``: the generated gradient pass caches what the HBP blocks need."""
    def update(x: Tensor, y: Tensor) -> float:
        optimizer.zero_grad()
        loss = curvature.forward_backward(x, y)
        optimizer.step()
        return loss.item()
    return update


def baselines(model: nn.Module, loss_fn: nn.Module, sgd_lr: float, sgd_momentum: float,
              adam_lr: float = 1e-3) -> list[Run]:
    """SGD and Adam on copies of ``model``."""
    sgd_model, adam_model = copy.deepcopy(model), copy.deepcopy(model)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=sgd_lr, momentum=sgd_momentum)
    adam = torch.optim.Adam(adam_model.parameters(), lr=adam_lr)
    return [Run(f"SGD (lr {sgd_lr:g}, momentum {sgd_momentum:g})", sgd_model, torch_update(sgd_model, sgd, loss_fn)),
            Run(f"Adam (lr {adam_lr:g})", adam_model, torch_update(adam_model, adam, loss_fn))]


def record(run: Run, step: int, epoch: float, train_loss: float, seconds: float, test: ImageData, loss_fn) -> dict:
    """One row of the curves: the test metrics now, with the mean training batch loss since the last row."""
    test_loss, test_accuracy = evaluate(run.model, test, loss_fn)
    return dict(optimizer=run.name, step=step, epoch=epoch, train_loss=train_loss, test_loss=test_loss,
                test_accuracy=test_accuracy, train_seconds=seconds)


def train(run: Run, train_data: ImageData, test: ImageData, loss_fn: nn.Module, args, steps: int) -> list[dict]:
    """Run ``steps`` updates, evaluating every ``args.eval_every`` steps and at the end; a non-finite loss stops."""
    rows = [record(run, 0, 0.0, math.nan, 0.0, test, loss_fn)]
    losses, seconds = [], 0.0
    data = islice(batches(train_data, args.batch_size, args.seed), steps)
    progress = tqdm(data, total=steps, desc=run.name, unit="step", leave=False)
    for step, (x, y) in enumerate(progress, 1):
        start = time.perf_counter()
        loss = run.update(x, y)
        seconds += time.perf_counter() - start
        losses.append(loss)
        if step % args.eval_every == 0 or step == steps or not math.isfinite(loss):
            epoch = step * args.batch_size / len(train_data.labels)
            rows.append(record(run, step, epoch, sum(losses) / len(losses), seconds, test, loss_fn))
            progress.set_postfix(test_acc=f"{rows[-1]['test_accuracy']:.3f}")
            losses = []
        if not math.isfinite(loss):
            print(f"{run.name}: the loss is {loss} at step {step}; stopping this run")
            break
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    """The curves, one row per evaluation."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Loss (test solid, training batches dashed, log scale) and test accuracy against steps (top) and
    training seconds (bottom), drawn with Agg (no pyplot)."""
    fig = Figure(figsize=(11, 8), layout="tight")
    axes = fig.subplots(2, 2)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    names = dict.fromkeys(r["optimizer"] for r in rows)
    for (loss_ax, acc_ax), x_key, x_label in zip(axes, ("step", "train_seconds"), ("step", "training seconds")):
        for rank, (color, marker, name) in enumerate(zip(colors, MARKERS, names)):
            curve = [r for r in rows if r["optimizer"] == name]
            xs = [r[x_key] for r in curve]
            style = dict(color=color, marker=marker, markersize=4, zorder=3 + len(names) - rank)  # first on top
            loss_ax.plot(xs, [r["test_loss"] for r in curve], label=name, **style)
            loss_ax.plot(xs, [r["train_loss"] for r in curve], linestyle="--", **style)
            acc_ax.plot(xs, [r["test_accuracy"] for r in curve], label=name, **style)
        loss_ax.plot([], [], color="gray", label="test")
        loss_ax.plot([], [], color="gray", linestyle="--", label="train (mean batch loss)")
        loss_ax.set(xlabel=x_label, ylabel="cross-entropy loss", yscale="log", title=f"loss against {x_label}")
        acc_ax.set(xlabel=x_label, ylabel="test accuracy", title=f"test accuracy against {x_label}")
        low, high = loss_ax.get_ylim()
        if high / low < 10:  # within one decade the labelled ticks are minor ones: print them plainly, not as 2×10⁰
            loss_ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            loss_ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        for ax in (loss_ax, acc_ax):
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def time_to_target(curve: list[dict], target: float) -> str:
    """``seconds s (step n)`` of the first evaluation with test accuracy >= ``target``, else ``not reached``."""
    for r in curve:
        if r["test_accuracy"] >= target:
            return f"{r['train_seconds']:.1f} s (step {r['step']})"
    return "not reached"


def summarize(rows: list[dict], target: float) -> None:
    """Print a markdown table: final training loss, test accuracy, training time and time to ``target``."""
    names = dict.fromkeys(r["optimizer"] for r in rows)
    print(f"final test accuracy (time to target = training seconds to test accuracy >= {target:g}):")
    print(f"| optimizer | final train loss | test accuracy | training time (s) | time to {target:g} |")
    print("|---|---|---|---|---|")
    for name in names:
        curve = [r for r in rows if r["optimizer"] == name]
        final = curve[-1]
        print(f"| {name} | {final['train_loss']:.4f} | {final['test_accuracy']:.4f} | "
              f"{final['train_seconds']:.1f} | {time_to_target(curve, target)} |")


def compare(runs: list[Run], args, loss_fn: nn.Module, train_data: ImageData, test: ImageData, title: str) -> None:
    """Train every run on the same batches, then write ``curves.csv`` and ``curves.png`` to ``args.out``."""
    steps = num_steps(args, len(train_data.labels))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [row for run in runs for row in train(run, train_data, test, loss_fn, args, steps)]
    write_csv(rows, args.out / "curves.csv")
    plot(rows, args.out / "curves.png", title)
    print(f"wrote {args.out / 'curves.csv'} and {args.out / 'curves.png'}")
    summarize(rows, args.target)
