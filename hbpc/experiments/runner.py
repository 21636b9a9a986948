"""Training runs with the paper's logging protocol, one CSV per (experiment, method, seed), resumable.

Logging (``exp/training/training.py`` of the paper's code): within every epoch, after the update on
batch ``idx`` with ``idx % (batches_per_epoch // logs_per_epoch) == 0``, one row records

* ``step``: training samples seen so far, ``epoch = step / training samples``;
* ``wall``: seconds since the first log, evaluations included;
* ``batch_loss``: the loss of that batch (before its update);
* ``train_loss``/``train_acc`` on a fresh random subset of the training samples, ``test_loss``/``test_acc``
  on the test samples.

A non-finite batch loss stops the run (status ``diverged``). A run writes ``seed<k>.csv.part`` while it
trains, renames it to ``seed<k>.csv`` when it ends and then writes ``seed<k>.json`` (settings, status,
seconds, machine): the JSON is the done marker. A run with a JSON for the same settings is skipped; one
without (interrupted) starts again from scratch.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from hbpc.data import ImageData, minibatches
from hbpc.experiments import setup
from hbpc.experiments.protocols import EXPERIMENTS, SGD, ADAM, Experiment, Method, Profile, Sizes
from hbpc.experiments.setup import SetupError

COLUMNS = ("step", "epoch", "wall", "batch_loss", "train_loss", "train_acc", "test_loss", "test_acc")
EVAL_BATCH = 1000
GENERATED = "generated"


@dataclass(frozen=True)
class Run:
    """One training run: ``method`` of ``experiment`` with ``seed``, sized by ``sizes``, on ``dataset``."""

    experiment: Experiment
    method: Method
    seed: int
    sizes: Sizes
    dataset: str

    @property
    def name(self) -> str:
        """``exp01/sgd/seed0``."""
        return f"{self.experiment.key}/{self.method.key}/seed{self.seed}"

    def settings(self) -> dict:
        """Everything the run's results depend on, as JSON values (what ``done`` compares)."""
        settings = dict(experiment=self.experiment.key, method=self.method.key, optimizer=self.method.optimizer,
                        batch_size=self.method.batch_size, hyper=self.method.hyper, seed=self.seed,
                        dataset=self.dataset, model=self.experiment.architecture.files[self.dataset],
                        init=self.experiment.architecture.init, **dataclasses.asdict(self.sizes))
        return json.loads(json.dumps(settings))

    def csv_path(self, out: Path) -> Path:
        """``OUT/exp/method/seed<k>.csv``."""
        return Path(out) / self.experiment.key / self.method.key / f"seed{self.seed}.csv"

    def meta_path(self, out: Path) -> Path:
        """``OUT/exp/method/seed<k>.json``, the done marker."""
        return self.csv_path(out).with_suffix(".json")


def plan(experiments: list[str], profile: Profile, dataset: str, seeds=None, overrides: dict | None = None,
         methods: list[str] | None = None, batch_size: int | None = None) -> list[Run]:
    """The runs of ``experiments`` (with the runs they borrow) under ``profile``, without duplicates.

    ``seeds`` replaces the profile's seeds, ``overrides`` fields of every ``Sizes``, ``methods`` keeps only
    those method keys, ``batch_size`` replaces every method's batch size (for quick checks only).
    """
    pairs = []
    for key in experiments:
        experiment = EXPERIMENTS[key]
        pairs += [(key, m.key) for m in experiment.methods] + list(experiment.borrowed)
    runs = []
    for key, method_key in dict.fromkeys(pairs):
        if methods and method_key not in methods:
            continue
        method = EXPERIMENTS[key].method(method_key)
        if batch_size is not None:
            method = dataclasses.replace(method, batch_size=batch_size)
        sizes = dataclasses.replace(profile.sizes[key], **(overrides or {}))
        runs += [Run(EXPERIMENTS[key], method, seed, sizes, dataset) for seed in (seeds or profile.seeds)]
    return runs


def state(run: Run, out: Path) -> str:
    """``done`` (finished with these settings), ``other`` (finished with other settings) or ``todo``."""
    meta = read_meta(run.meta_path(out))
    if meta is None or not run.csv_path(out).is_file():
        return "todo"
    return "done" if meta.get("settings") == run.settings() else "other"


def is_done(run: Run, out: Path, overwrite: bool = False) -> bool:
    """Whether ``run`` finished before with the same settings.

    A finished run with other settings raises ``SetupError`` unless ``overwrite`` (then it reruns).
    """
    found = state(run, out)
    if found == "other" and not overwrite:
        stored = read_meta(run.meta_path(out))["settings"]
        changed = sorted(k for k in set(stored) | set(run.settings()) if stored.get(k) != run.settings().get(k))
        raise SetupError(f"{run.meta_path(out)} holds a finished run with other settings ({', '.join(changed)} "
                         "differ); pass --overwrite to recompute it, or --out to write elsewhere")
    return found == "done"


def read_meta(path: Path) -> dict | None:
    """The JSON at ``path``, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1)
    os.replace(tmp, path)


def log_interval(batches_per_epoch: int, logs_per_epoch: int) -> int:
    """Batches between logs: ``batches // logs`` as in the paper, at least 1."""
    return max(1, batches_per_epoch // logs_per_epoch)


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: nn.Module, data: ImageData) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``data``."""
    loss, correct = 0.0, 0
    for x, y in minibatches(data.images, data.labels, EVAL_BATCH, shuffle=False):
        logits = model(x)
        loss += loss_fn(logits, y).item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
    return loss / len(data.labels), correct / len(data.labels)


def train(run: Run, model: nn.Module, loss_fn: nn.Module, update: setup.Update, train_data: ImageData,
          test_data: ImageData, write: Callable[[dict], None], bar: tqdm) -> tuple[str, int]:
    """Train ``run`` and ``write`` every log row; returns ``(status, samples seen)``, status ``finished``
    or ``diverged`` (non-finite batch loss)."""
    sizes, batch = run.sizes, run.method.batch_size
    batches = len(train_data.labels) // batch
    every = log_interval(batches, sizes.logs_per_epoch)
    order = torch.Generator().manual_seed(run.seed)
    draws = torch.Generator().manual_seed(run.seed + 1)
    start, step = None, 0
    for _ in range(sizes.epochs):
        for idx, (x, y) in enumerate(minibatches(train_data.images, train_data.labels, batch, order, drop_last=True)):
            model.train()
            loss = update(x, y)
            step += batch
            bar.update()
            if not math.isfinite(loss):
                return "diverged", step
            if idx % every == 0:
                now = time.perf_counter()
                start = now if start is None else start
                model.eval()
                train_loss, train_acc = evaluate(model, loss_fn, setup.subset(train_data, sizes.train_eval_samples,
                                                                              draws))
                test_loss, test_acc = evaluate(model, loss_fn, test_data)
                write(dict(step=step, epoch=step / len(train_data.labels), wall=now - start, batch_loss=loss,
                           train_loss=train_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc))
                bar.set_postfix(loss=f"{loss:.3f}", test_acc=f"{test_acc:.3f}")
    return "finished", step


class Workspace:
    """The output folder, the dataset and what runs share: loaded data and compiled curvature modules."""

    def __init__(self, out: Path, dataset: str, data_dir=None, profile: str = ""):
        self.out, self.dataset, self.data_dir, self.profile = Path(out), dataset, data_dir, profile
        self.loaded: tuple[ImageData, ImageData] | None = None
        self.modules: dict[str, object] = {}

    def data(self) -> tuple[ImageData, ImageData]:
        """``(train, test)``, loaded once."""
        if self.loaded is None:
            self.loaded = setup.load_data(self.dataset, self.data_dir)
        return self.loaded

    def curvature_module(self, spec):
        """The compiled module of the model file ``spec.path``, in ``OUT/generated``, compiled once per process."""
        path = self.out / GENERATED / f"curv_{Path(spec.path).stem}.py"
        if str(path) not in self.modules:
            self.modules[str(path)] = setup.compiled_module(spec, path)
        return self.modules[str(path)]


def execute(run: Run, workspace: Workspace, position: int = 1) -> dict:
    """Train ``run`` from scratch, write its CSV and then its JSON; returns the JSON's contents."""
    began = time.perf_counter()
    train_all, test_all = workspace.data()
    spec = setup.load_spec(run.experiment.architecture, run.dataset)
    setup.seed_everything(run.seed)
    setup.initialize(spec.model, run.experiment.architecture.init)
    first_order = run.method.optimizer in (SGD, ADAM)
    module = None if first_order else workspace.curvature_module(spec)
    train_data = setup.subset(train_all, run.sizes.train_samples, torch.Generator().manual_seed(run.seed))
    test_data = setup.subset(test_all, run.sizes.test_samples)
    if len(train_data.labels) < run.method.batch_size:
        raise SetupError(f"{run.name}: batch size {run.method.batch_size} exceeds the {len(train_data.labels)} "
                         "training samples; raise --train-samples")
    update = setup.make_update(run.method, spec.model, spec.loss_fn, module, run.seed)
    path = run.csv_path(workspace.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".csv.part")
    total = run.sizes.epochs * (len(train_data.labels) // run.method.batch_size)
    with part.open("w", newline="") as handle, tqdm(total=total, desc=run.name, unit="step", leave=False,
                                                    position=position, dynamic_ncols=True) as bar:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()

        def write(row: dict) -> None:
            writer.writerow(row)
            handle.flush()

        status, samples = train(run, spec.model, spec.loss_fn, update, train_data, test_data, write, bar)
    os.replace(part, path)
    meta = dict(settings=run.settings(), profile=workspace.profile, status=status, samples=samples,
                seconds=time.perf_counter() - began, machine=setup.machine(),
                finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_json(run.meta_path(workspace.out), meta)
    return meta


def execute_all(runs: list[Run], workspace: Workspace, overwrite: bool = False) -> list[Run]:
    """Train every run that is not done (overall progress bar); returns the runs trained."""
    todo = [run for run in runs if not is_done(run, workspace.out, overwrite)]
    skipped = len(runs) - len(todo)
    if skipped:
        tqdm.write(f"{skipped} of {len(runs)} runs already done in {workspace.out}; skipping them")
    if not todo:
        return todo
    with tqdm(total=len(todo), desc="runs", unit="run", position=0, dynamic_ncols=True) as bar:
        for run in todo:
            bar.set_postfix_str(run.name)
            meta = execute(run, workspace)
            if meta["status"] != "finished":
                tqdm.write(f"{run.name}: {meta['status']} after {meta['samples']} samples (non-finite loss)")
            bar.update()
    return todo
