"""Measured cost of every method's update step and of one log, and what a profile will take.

``hbpc-experiments timing`` trains each method for a few steps with its real batch size (after one
untimed warm-up step, which also compiles the curvature module) and evaluates one log's samples three
times; the medians (robust to other processes sharing the cores) are multiplied by each run's steps and
logs under the chosen sizes.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from hbpc.data import minibatches
from hbpc.experiments import setup
from hbpc.experiments.protocols import ADAM, SGD
from hbpc.experiments.runner import Run, Workspace, evaluate, log_interval
from hbpc.experiments.setup import SetupError

LOG_REPEATS = 3


@dataclass(frozen=True)
class Cost:
    """Seconds per update step and per log (evaluation), and the run's estimated seconds."""

    run: Run
    step: float
    log: float
    estimate: float


def run_length(run: Run, n_train: int) -> tuple[int, int]:
    """``(update steps, logs)`` of one run on ``n_train`` training samples."""
    batches = n_train // run.method.batch_size
    every = log_interval(batches, run.sizes.logs_per_epoch)
    return run.sizes.epochs * batches, run.sizes.epochs * len(range(0, batches, every))


def measure(run: Run, workspace: Workspace, steps: int) -> Cost:
    """Median seconds of ``steps`` updates (after one warm-up) and of one log of ``run``."""
    train_all, test_all = workspace.data()
    spec = setup.load_spec(run.experiment.architecture, run.dataset)
    setup.seed_everything(run.seed)
    setup.initialize(spec.model, run.experiment.architecture.init)
    module = None if run.method.optimizer in (SGD, ADAM) else workspace.curvature_module(spec)
    update = setup.make_update(run.method, spec.model, spec.loss_fn, module, run.seed)
    data = setup.subset(train_all, run.method.batch_size * (steps + 1), torch.Generator().manual_seed(run.seed))
    if len(data.labels) < run.method.batch_size * (steps + 1):
        raise SetupError(f"timing {run.name} needs {run.method.batch_size * (steps + 1)} training samples, "
                         f"the data hold {len(data.labels)}; lower --steps or --batch-size")
    batches = list(minibatches(data.images, data.labels, run.method.batch_size, drop_last=True))
    update(*batches[0])
    step = median_seconds([lambda x=x, y=y: update(x, y) for x, y in batches[1:]])
    train_eval = setup.subset(train_all, run.sizes.train_eval_samples)
    test = setup.subset(test_all, run.sizes.test_samples)
    log = median_seconds([lambda: (evaluate(spec.model, spec.loss_fn, train_eval),
                                   evaluate(spec.model, spec.loss_fn, test))] * LOG_REPEATS)
    n_train = min(len(train_all.labels), run.sizes.train_samples or len(train_all.labels))
    n_steps, n_logs = run_length(run, n_train)
    return Cost(run, step, log, n_steps * step + n_logs * log)


def median_seconds(calls: list[Callable[[], object]]) -> float:
    """Median wall-clock seconds of the ``calls``, run one after another."""
    seconds = []
    for call in calls:
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure_all(runs: list[Run], workspace: Workspace, steps: int) -> list[Cost]:
    """``Cost`` of one seed of every method among ``runs``; the estimate covers all seeds of that method."""
    first = {}
    for run in runs:
        first.setdefault((run.experiment.key, run.method.key), run)
    seeds = {key: sum((r.experiment.key, r.method.key) == key for r in runs) for key in first}
    costs = []
    for key, run in tqdm(first.items(), desc="timing", unit="method"):
        cost = measure(run, workspace, steps)
        costs.append(Cost(run, cost.step, cost.log, cost.estimate * seeds[key]))
    return costs


def report(costs: list[Cost], profile: str) -> str:
    """Markdown table of the measured costs and the estimated total."""
    lines = [f"| experiment | method | batch | s/step (median) | s/log (median) | estimated s ({profile}, all seeds) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {c.run.experiment.key} | {c.run.method.key} | {c.run.method.batch_size} | {c.step:.3f} | "
              f"{c.log:.3f} | {c.estimate:.0f} |" for c in costs]
    total = sum(c.estimate for c in costs)
    lines += ["", f"Estimated total: {total / 60:.1f} min on {setup.machine()['threads']} threads "
              "(compilation and CG iteration counts that change during training not included)."]
    return "\n".join(lines)
