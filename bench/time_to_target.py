"""Time to a target test accuracy: Newton-CG, KFAC, SGD and Adam on Fashion-MNIST, interleaved in one run.

    .venv/bin/python -m bench.time_to_target                 # both problems, writes bench/RESULTS-time-to-target.md
    .venv/bin/python -m bench.time_to_target --problems fcnn --budget-scale 0.5

Problems (``PROBLEMS``): the HBP paper's sigmoid FCNN (``examples/models/fcnn_fashion_mnist.py``), where SGD
sits on a plateau (and Adam leaves it after a few hundred steps), and a ReLU c4d3 (``bench/models/c4d3_relu_fashion_mnist.py``),
an ordinary CNN. Every run of a problem starts from the same initial weights and sees the same
sequence of minibatches (one seeded shuffle per epoch, the same seed for every run).

Runs are interleaved: each round gives every unfinished run one step, so that load on a shared
machine hits all methods alike. Only the update steps are timed (``time.perf_counter`` around
gradient, curvature and step); evaluations, compilation and data loading are not. A run is
evaluated on the first ``--test`` test images after a step once ``EVAL_SECONDS`` of its training
time has passed since its last evaluation (and after its first step), so the time to target is
resolved to about ``EVAL_SECONDS``; it is the training time and step count at the first
evaluation with accuracy >= the problem's target.

A run stops at the target, at ``budget`` seconds of training time, after ``max_steps`` steps, on
a non-finite loss, or once it has spent ``PRUNE`` times the best time to target of the problem
(it cannot come closer than that factor).

Batch orders: the whole sweep runs once per seed of ``Problem.seeds`` (the FCNN three, whose
plateau makes single runs vary; the CNN one). A configuration's time to target is the median
over the seeds (not reached in a seed counts as infinitely slow). The table reports, per method,
the configuration of its sweep with the best median, its median's ratio to the median of Adam's
best configuration, and the times per seed.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS-time-to-target.md"
EVAL_SECONDS = 0.5
PRUNE = 3.0


@dataclass(frozen=True)
class Problem:
    """A model file, batch size, target test accuracy and per-run limits."""

    key: str
    title: str
    model_file: Path
    batch_size: int
    target: float
    budget: float  # seconds of training time per run
    max_steps: int
    why: str
    seeds: tuple[int, ...] = (0,)  # batch orders; the table reports medians over them


@dataclass(frozen=True)
class Config:
    """One optimizer configuration: ``method`` names the table row, ``label`` the configuration."""

    method: str
    label: str
    optimizer: str  # sgd | adam | kfac | newton
    options: dict = field(default_factory=dict)
    closure: bool = False  # NewtonCG: step(closure), which enables its loss checks
    batch_size: int | None = None  # None: the problem's

    def batch(self, problem: "Problem") -> int:
        """This configuration's batch size on ``problem``."""
        return self.batch_size or problem.batch_size

    def name(self, problem: "Problem") -> str:
        """``label`` with the batch size."""
        return f"{self.label}, batch {self.batch(problem)}"


PROBLEMS = {
    "fcnn": Problem("fcnn", "sigmoid FCNN (HBP paper, 784-1024-512-256-128-64-32-16-10)",
                    ROOT / "examples" / "models" / "fcnn_fashion_mnist.py", 128, 0.60, 45.0, 3000,
                    "a sigmoid plateau at chance (loss ln 10): SGD stays on it, Adam leaves it after a few hundred steps",
                    seeds=(0, 1, 2)),
    "cnn": Problem("cnn", "ReLU c4d3 (4 conv, 3 linear, 853k parameters)",
                   ROOT / "bench" / "models" / "c4d3_relu_fashion_mnist.py", 128, 0.80, 45.0, 3000,
                   "an ordinary ReLU CNN: no plateau, Adam's home ground"),
}

def configs(problem: str) -> list[Config]:
    """The sweeps over learning rate and batch size: SGD (momentum 0.9), Adam, KFAC and Newton-CG (``SWEEPS``)."""
    return SWEEPS[problem]


BIG = 512  # a second batch size, where a curvature step's fixed (batch-independent) cost amortises
_FIRST_ORDER = [Config("SGD", "lr 0.5, momentum 0.9", "sgd", dict(lr=0.5, momentum=0.9)),
                Config("Adam", "lr 0.001", "adam", dict(lr=1e-3)), Config("Adam", "lr 0.003", "adam", dict(lr=3e-3)),
                Config("KFAC", "lr 1", "kfac", dict(lr=1.0))]
_DEFAULTS = "NewtonCG(params, curv), step(closure)"
SWEEPS = {
    "fcnn": _FIRST_ORDER + [
        Config("Adam", "lr 0.001", "adam", dict(lr=1e-3), batch_size=BIG),
        Config("Adam", "lr 0.003", "adam", dict(lr=3e-3), batch_size=BIG),
        Config("Newton-CG (defaults)", _DEFAULTS, "newton", {}, closure=True),
        Config("Newton-CG (defaults)", _DEFAULTS, "newton", {}, closure=True, batch_size=BIG),
        Config("Newton-CG (tuned)", "preset KRONECKER", "newton", dict(preset="KRONECKER"), closure=True,
               batch_size=BIG)],
    # c4d3: blocks() refuses at batch 128 (memory), so the defaults run CG on block products; tuned: those
    # products on a quarter of the batch (SubsampledCurvature)
    "cnn": _FIRST_ORDER + [
        Config("Newton-CG (defaults)", _DEFAULTS, "newton", {}, closure=True),
        Config("Newton-CG (tuned)", "curvature on a quarter of the batch", "newton", dict(subsample=0.25),
               closure=True)],
}


def newton_options(options: dict) -> dict:
    """NewtonCG keyword arguments: a ``preset`` (a name in ``hbpc.optim``) updated by the other options."""
    import hbpc.optim

    options = dict(options)
    preset = options.pop("preset", None)
    return {**(getattr(hbpc.optim, preset) if preset else {}), **options}


def describe(options: dict) -> str:
    """``key value`` pairs of ``options``."""
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in options.items())


def load_module(path: Path, name: str):
    """Import a file as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Run:
    """One configuration training its own copy of the initial model on the shared batch order."""

    def __init__(self, config: Config, model: nn.Module, loss_fn: nn.Module, generated, batches):
        from hbpc.optim import KFAC, NewtonCG, SubsampledCurvature

        self.config, self.model, self.loss_fn, self.batches = config, model, loss_fn, batches
        self.seconds, self.steps, self.since_eval = 0.0, 0, 0.0
        self.accuracy, self.loss = math.nan, math.nan
        self.reached: tuple[float, int] | None = None  # (seconds, steps) at the target
        self.stopped: str | None = None
        self.error = ""
        self.curvature = generated.Curvature(model) if config.optimizer in ("kfac", "newton") else None
        params = model.parameters()
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, **config.options)
        elif config.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, **config.options)
        elif config.optimizer == "kfac":
            self.optimizer = KFAC(params, self.curvature, generator=torch.Generator().manual_seed(0), **config.options)
        else:
            options = newton_options(config.options)
            subsample = options.pop("subsample", None)
            if subsample:  # gradient on the whole batch, curvature products on this fraction of it
                self.curvature = SubsampledCurvature(self.curvature, subsample)
            self.optimizer = NewtonCG(params, self.curvature, **options)

    def update(self, x: Tensor, y: Tensor) -> float:
        """One optimizer step on ``(x, y)``; the loss before it."""
        self.optimizer.zero_grad()
        if self.curvature is None:
            loss = self.loss_fn(self.model(x), y)
            loss.backward()
            self.optimizer.step()
        elif self.config.closure:
            loss = self.optimizer.step(lambda: self.curvature.forward_backward(x, y))
        else:
            loss = self.curvature.forward_backward(x, y)
            self.optimizer.step()
        return float(loss.detach())

    def step(self) -> bool:
        """Take one timed step; ``True`` when an evaluation is due."""
        x, y = next(self.batches)
        start = time.perf_counter()
        try:
            self.loss = self.update(x, y)
        except (MemoryError, RuntimeError, ValueError) as error:  # recorded in the table, the other runs go on
            self.stopped = f"error: {type(error).__name__}"
            self.error = str(error)
            return False
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        self.since_eval += elapsed
        self.steps += 1
        if not math.isfinite(self.loss):
            self.stopped = "diverged"
        return self.steps == 1 or self.since_eval >= EVAL_SECONDS


def batch_stream(images: Tensor, labels: Tensor, batch_size: int, seed: int):
    """Endless full minibatches; every epoch reshuffled by one generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            yield images[index], labels[index]


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Test accuracy of ``model``."""
    return (model(images).argmax(1) == labels).float().mean().item()


def run_problem(problem: Problem, data, test_count: int, budget_scale: float, seed: int = 0,
                sweep: list[Config] | None = None, generated=None, progress: bool = True) -> list[Run]:
    """Train every configuration of ``problem`` interleaved until each stops; return the runs."""
    train, test = data
    test_images, test_labels = test.images[:test_count], test.labels[:test_count]
    spec = load_module(problem.model_file, f"ttt_model_{problem.key}")
    initial = spec.build_model()
    if generated is None:
        import hbpc

        generated = hbpc.compile_model(initial, spec.example_input, spec.loss_fn)
    runs = [Run(config, copy.deepcopy(initial), spec.loss_fn, generated,
                batch_stream(train.images, train.labels, config.batch(problem), seed))
            for config in (sweep if sweep is not None else configs(problem.key))]
    budget = problem.budget * budget_scale
    bar = tqdm(total=len(runs), desc=problem.key, unit="run", disable=not progress)
    active = list(runs)
    while active:
        for run in list(active):
            if run.step():
                run.since_eval = 0.0
                run.accuracy = accuracy(run.model, test_images, test_labels)
                if run.accuracy >= problem.target:
                    run.reached, run.stopped = (run.seconds, run.steps), "target"
            best = min((r.reached[0] for r in runs if r.reached), default=math.inf)
            if run.stopped is None:
                if run.seconds >= budget:
                    run.stopped = "budget"
                elif run.steps >= problem.max_steps:
                    run.stopped = "max steps"
                elif run.seconds >= PRUNE * best:
                    run.stopped = f"over {PRUNE:g}x the best"
            if run.stopped:
                if run.stopped != "target":
                    run.accuracy = accuracy(run.model, test_images, test_labels)
                active.remove(run)
                bar.update(1)
                bar.write(f"  {run.config.method:22s} {run.config.name(problem):55s} {run.stopped:14s} "
                          f"{run.seconds:7.1f} s {run.steps:5d} steps  acc {run.accuracy:.3f} {run.error}")
        bar.set_postfix(active=len(active))
    bar.close()
    return runs


def median_time(runs: list[Run]) -> float:
    """Median time to target over the seeds' runs of one configuration (``inf`` for a run that missed)."""
    return statistics.median(run.reached[0] if run.reached else math.inf for run in runs)


def by_config(runs_by_seed: dict[int, list[Run]]) -> list[list[Run]]:
    """The runs of each configuration, one per seed, in sweep order."""
    return [list(runs) for runs in zip(*runs_by_seed.values())]


def best_per_method(runs_by_seed: dict[int, list[Run]]) -> dict[str, list[Run]]:
    """Per method, the configuration with the best median time (else the best mean last accuracy)."""
    best: dict[str, tuple[tuple, list[Run]]] = {}
    for runs in by_config(runs_by_seed):
        key = (median_time(runs), -statistics.mean(r.accuracy for r in runs))
        method = runs[0].config.method
        if method not in best or key < best[method][0]:
            best[method] = (key, runs)
    return {method: runs for method, (_, runs) in best.items()}


def table(problem: Problem, runs_by_seed: dict[int, list[Run]], budget_scale: float = 1.0) -> list[str]:
    """Markdown: per method the best configuration's median time, steps and ratio to Adam, then every run."""
    best = best_per_method(runs_by_seed)
    adam = median_time(best["Adam"]) if "Adam" in best else math.inf
    seeds = ", ".join(str(seed) for seed in runs_by_seed)
    lines = [f"### {problem.title}", "",
             f"Target: test accuracy {problem.target:.2f}; batch {problem.batch_size} unless the configuration says; budget "
             f"{problem.budget * budget_scale:g} s of training time per run; batch-order seeds {seeds} (median). "
             f"Why this problem: {problem.why}.", "",
             "| method | best configuration | median time to target (s) | median steps | ratio to Adam | "
             "time per seed (s) | s/step |", "|---|---|---|---|---|---|---|"]
    for method, runs in best.items():
        seconds = median_time(runs)
        per_step = sum(r.seconds for r in runs) / max(sum(r.steps for r in runs), 1)
        per_seed = " / ".join(f"{r.reached[0]:.1f}" if r.reached else f"> {r.seconds:.0f}" for r in runs)
        if math.isfinite(seconds):
            steps = statistics.median(r.reached[1] if r.reached else math.inf for r in runs)
            cells = f"{seconds:.1f} | {steps:g}"
            ratio = f"{seconds / adam:.2f}x" if math.isfinite(adam) else "n/a"
        else:
            last = runs[len(runs) // 2]
            cells = f"not reached ({last.stopped}, accuracy {last.accuracy:.3f}) | > {last.steps}"
            ratio = "n/a" if any(r.error for r in runs) or not math.isfinite(adam) else \
                f"> {statistics.median(r.seconds for r in runs) / adam:.2f}x"
        lines.append(f"| {method} | {runs[0].config.name(problem)} | {cells} | {ratio} | {per_seed} | {per_step:.3f} |")
    lines += ["", "<details><summary>every run of the sweep</summary>", "",
              "| method | configuration | seed | stopped | training s | steps | last test accuracy |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.config.method} | {r.config.name(problem)} | {seed} | {r.stopped} | {r.seconds:.1f} | {r.steps} | "
              f"{r.accuracy:.3f} |" for seed, runs in runs_by_seed.items() for r in runs]
    return lines + ["", "</details>", ""]


def fashion_mnist(data_dir=None):
    """Standardized ``(train, test)`` of Fashion-MNIST, or None after saying on stderr that its files are missing."""
    from hbpc.data import DatasetMissing
    from hbpc.experiments.setup import load_data

    try:
        return load_data("fashion-mnist", data_dir)
    except DatasetMissing as error:
        print(f"{error}\nInstall it with: apt-get install dataset-fashion-mnist", file=sys.stderr)
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="fcnn,cnn", help="comma-separated, from: " + ", ".join(PROBLEMS))
    parser.add_argument("--test", type=int, default=2000, help="test images evaluated (default: %(default)s)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every per-run budget")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write (default: %(default)s)")
    parser.add_argument("--methods", default=None, help="comma-separated table rows to run (default: all)")
    parser.add_argument("--seeds", default=None, help="comma-separated batch-order seeds (default: each problem's)")
    parser.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST's directory (default: hbpc's search)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = fashion_mnist(args.data_dir)
    if data is None:
        return 1
    started = time.perf_counter()
    sections: list[str] = []
    for key in args.problems.split(","):
        problem = PROBLEMS[key]
        seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else problem.seeds
        sweep = [config for config in configs(key) if not args.methods or config.method in args.methods.split(",")]
        runs = {seed: run_problem(problem, data, args.test, args.budget_scale, seed, sweep) for seed in seeds}
        sections += table(problem, runs, args.budget_scale)
        text = "\n".join(header(args.test, time.perf_counter() - started) + sections)
        args.out.write_text(text + "\n")  # after every problem, so that an interrupted run keeps what it measured
    print(text)
    return 0


def header(test_count: int, seconds: float) -> list[str]:
    """The results file's title and how the figures were measured."""
    return ["# Time to target accuracy on Fashion-MNIST", "",
            f"`python -m bench.time_to_target` on {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}; whole run {seconds / 60:.1f} min. "
            "Times are training seconds (update steps only) of runs interleaved step by step in one process; "
            f"test accuracy on the first {test_count} test images, evaluated every {EVAL_SECONDS:g} s of "
            "training time. Compare rows of one run only.", ""]


if __name__ == "__main__":
    sys.exit(main())
