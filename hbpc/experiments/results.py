"""Reading the per-seed CSVs, merging seeds (mean ± std on ``step``) and the markdown table of final values."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from hbpc.experiments.protocols import EXPERIMENTS, Experiment
from hbpc.experiments.runner import COLUMNS, read_meta

METRICS = COLUMNS[2:]  # wall, batch_loss, train_loss, train_acc, test_loss, test_acc
MERGED = "merged"


def read_curve(path: Path) -> dict[str, np.ndarray]:
    """One per-seed CSV as ``{column: float array}``."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {column: np.array([float(row[column]) for row in rows]) for column in COLUMNS}


def finished_runs(out: Path, experiment: str, method: str) -> dict[int, tuple[dict, dict[str, np.ndarray]]]:
    """``{seed: (done marker, curve)}`` of the finished seeds (JSON and CSV present) of one method."""
    runs = {}
    for meta_path in sorted((Path(out) / experiment / method).glob("seed*.json")):
        meta, csv_path = read_meta(meta_path), meta_path.with_suffix(".csv")
        if meta is not None and csv_path.is_file():
            runs[meta["settings"]["seed"]] = (meta, read_curve(csv_path))
    return runs


def seed_curves(out: Path, experiment: str, method: str) -> dict[int, dict[str, np.ndarray]]:
    """``{seed: curve}`` of the finished seeds of one method."""
    return {seed: curve for seed, (_, curve) in finished_runs(out, experiment, method).items()}


def merge(curves: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Merge seed curves on ``step``: per step present in any curve, ``n`` (seeds with that step), ``epoch``,
    and ``<metric>_mean`` / ``<metric>_std`` for every metric.

    The std is the sample standard deviation (``ddof=1``), 0 where only one seed has the step.
    """
    steps = np.unique(np.concatenate([c["step"] for c in curves])) if curves else np.array([])
    merged = {"step": steps, "epoch": np.full(len(steps), np.nan), "n": np.zeros(len(steps))}
    stacks = {metric: np.full((len(curves), len(steps)), np.nan) for metric in METRICS}
    for row, curve in enumerate(curves):
        where = np.searchsorted(steps, curve["step"])
        merged["epoch"][where] = curve["epoch"]
        merged["n"][where] += 1
        for metric in METRICS:
            stacks[metric][row, where] = curve[metric]
    for metric, stack in stacks.items():
        merged[f"{metric}_mean"] = column_mean(stack)
        merged[f"{metric}_std"] = column_std(stack)
    return merged


def column_mean(stack: np.ndarray) -> np.ndarray:
    """Mean over the rows of ``stack``, ignoring NaN (missing seeds)."""
    counts = np.sum(~np.isnan(stack), axis=0)
    return np.where(counts > 0, np.nansum(stack, axis=0) / np.maximum(counts, 1), np.nan)


def column_std(stack: np.ndarray) -> np.ndarray:
    """Sample std (``ddof=1``) over the rows of ``stack``, ignoring NaN; 0 where one value is present."""
    counts = np.sum(~np.isnan(stack), axis=0)
    deviations = np.where(np.isnan(stack), 0.0, stack - column_mean(stack))
    return np.sqrt(np.sum(deviations ** 2, axis=0) / np.maximum(counts - 1, 1))


def write_merged(merged: dict[str, np.ndarray], path: Path) -> None:
    """The merged curve as CSV (one row per step)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(merged)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for i in range(len(merged["step"])):
            writer.writerow([format_number(merged[c][i]) for c in columns])


def format_number(value: float) -> str:
    """Integers plainly, other floats with 6 significant digits."""
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def merge_all(out: Path) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Merge every method of every experiment with finished seeds; writes ``OUT/exp/merged/<method>.csv``."""
    merged = {}
    for experiment in EXPERIMENTS.values():
        for method in experiment.methods:
            curves = seed_curves(out, experiment.key, method.key)
            if curves:
                merged[experiment.key, method.key] = merge(list(curves.values()))
                write_merged(merged[experiment.key, method.key], Path(out) / experiment.key / MERGED /
                             f"{method.key}.csv")
    return merged


def run_metas(out: Path) -> list[dict]:
    """The done markers of every finished run under ``out``."""
    metas = [read_meta(p) for key in EXPERIMENTS for p in sorted((Path(out) / key).glob("*/seed*.json"))]
    return [m for m in metas if m is not None]


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample std) of the finite values, with the count when some are missing."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "—"
    text = f"{np.mean(finite):.4f} ± {np.std(finite, ddof=1) if len(finite) > 1 else 0.0:.4f}"
    return text if len(finite) == len(values) else f"{text} ({len(finite)} of {len(values)})"


def final_value(meta: dict, curve: dict[str, np.ndarray], metric: str) -> float:
    """``metric`` at the run's last log; NaN for a diverged run or one without logs."""
    return curve[metric][-1] if meta["status"] == "finished" and len(curve["step"]) else math.nan


def final_rows(out: Path, experiment: Experiment) -> list[list[str]]:
    """Per method with finished seeds: label, seeds, final train loss and test accuracy (mean ± std over
    seeds; diverged seeds count as missing), diverged runs, and the mean seconds per run."""
    rows = []
    for method in experiment.methods:
        runs = list(finished_runs(out, experiment.key, method.key).values())
        if not runs:
            continue
        diverged = sum(meta["status"] != "finished" for meta, _ in runs)
        seconds = np.mean([meta["seconds"] for meta, _ in runs])
        rows.append([method.label, str(len(runs)),
                     mean_std([final_value(meta, curve, "train_loss") for meta, curve in runs]),
                     mean_std([final_value(meta, curve, "test_acc") for meta, curve in runs]),
                     str(diverged), f"{seconds:.0f}"])
    return rows


def describe_sizes(pairs: tuple[tuple[str, object], ...]) -> str:
    """``epochs 2, train_samples all, ...`` from ``(name, value)`` pairs (``None`` meaning all samples)."""
    return ", ".join(f"{name} {'all' if value is None else value}" for name, value in pairs)


def sizes_line(metas: list[dict], experiment: str) -> str:
    """The sizes the finished runs of ``experiment`` used (distinct settings joined by ``;``)."""
    keys = ("epochs", "logs_per_epoch", "train_samples", "train_eval_samples", "test_samples")
    found = {tuple((k, m["settings"][k]) for k in keys) for m in metas if m["settings"]["experiment"] == experiment}
    return "; ".join(describe_sizes(pairs) for pairs in sorted(found, key=str))


def table(out: Path) -> str:
    """``RESULTS.md``: per experiment the final values per method, then profile, machine and total time."""
    metas = run_metas(out)
    lines = ["# HBP paper experiments: results", ""]
    if not metas:
        return "\n".join(lines + ["No finished runs yet: run `hbpc-experiments all`.", ""])
    datasets = sorted({m["settings"]["dataset"] for m in metas})
    profiles = sorted({m["profile"] for m in metas})
    lines += [f"Dataset: {', '.join(datasets)}. Profile: {', '.join(profiles)}. Values at the last log of each run, "
              "mean ± sample std over seeds.", ""]
    for experiment in EXPERIMENTS.values():
        rows = final_rows(out, experiment)
        if not rows:
            continue
        lines += [f"## {experiment.key}: {experiment.title}", "", f"Sizes: {sizes_line(metas, experiment.key)}.", "",
                  "| method | seeds | final train loss | final test accuracy | diverged | seconds per run |",
                  "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    machines = sorted({(m["machine"]["nproc"], m["machine"]["cpu"], m["machine"]["torch"], m["machine"]["threads"])
                       for m in metas})
    lines += ["## Machine and time", ""]
    lines += [f"- {nproc} cores (`nproc`), {cpu}, torch {torch}, {threads} threads" for nproc, cpu, torch, threads
              in machines]
    total = sum(m["seconds"] for m in metas)
    lines += [f"- {len(metas)} runs, total wall time {total / 60:.1f} min (sum over runs, evaluation and "
              "compilation included)", ""]
    return "\n".join(lines)
