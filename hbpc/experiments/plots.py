"""The paper's figures as PNGs: training loss (left) and test accuracy (right), mean ± std over seeds.

Each ``Figure`` names its curves as ``(experiment, method)`` pairs in the paper's order; ``wall`` figures
plot every seed against wall-clock seconds instead (Fig. 5b). Drawn with matplotlib's Agg canvas (no pyplot).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure as MplFigure

from hbpc.experiments.protocols import find_method
from hbpc.experiments.results import merge, seed_curves

PANELS = (("train_loss", "training loss"), ("test_acc", "test accuracy"))


@dataclass(frozen=True)
class Figure:
    """One PNG: ``curves`` as ``(experiment, method)``; ``wall``: per-seed curves against seconds."""

    name: str
    title: str
    curves: tuple[tuple[str, str], ...]
    wall: bool = False


FIGURES = (
    Figure("fig4", "Fig. 4: FCNN, PCH-abs with parameter splitting (exp02) vs. SGD (exp01)",
           (("exp01", "sgd"), ("exp02", "pch-abs-split1"), ("exp02", "pch-abs-split2"),
            ("exp02", "pch-abs-split4"), ("exp02", "pch-abs-split16"))),
    Figure("exp01", "exp01 (not in the paper): FCNN, SGD vs. CG-Newton on HBP blocks",
           (("exp01", "sgd"), ("exp01", "ggn"), ("exp01", "pch-abs"), ("exp01", "pch-clip"))),
    Figure("fig5a", "Fig. 5a: c4d3 with sigmoids (exp08)",
           tuple(("exp08", m) for m in ("sgd", "adam", "kfac", "pch-abs", "pch-clip", "ggn-alpha1", "ggn-alpha2"))),
    Figure("fig5b", "Fig. 5b: c4d3 with sigmoids (exp08) vs. wall-clock time, every seed",
           (("exp08", "adam"), ("exp08", "kfac"), ("exp08", "ggn-alpha1")), wall=True),
    Figure("figS6", "Fig. S6: DeepOBS 3c3d with sigmoids (exp09)",
           tuple(("exp09", m) for m in ("sgd", "adam", "pch-abs", "pch-clip", "ggn"))),
)


def draw_mean_std(ax, merged: dict[str, np.ndarray], metric: str, label: str, color) -> None:
    """Mean against epoch with a ±1 std band."""
    mean, std = merged[f"{metric}_mean"], merged[f"{metric}_std"]
    ax.plot(merged["epoch"], mean, color=color, label=label, marker="o", markersize=2.5)
    ax.fill_between(merged["epoch"], mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def draw_seeds(ax, curves: list[dict[str, np.ndarray]], metric: str, label: str, color) -> None:
    """Every seed's curve against wall-clock seconds, one legend entry."""
    for i, curve in enumerate(curves):
        ax.plot(curve["wall"], curve[metric], color=color, alpha=0.7, linewidth=1, label=label if i == 0 else None)


def plot_figure(figure: Figure, out: Path) -> Path | None:
    """Write ``OUT/<name>.png`` from the finished runs; ``None`` (nothing written) when no curve has data."""
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    fig = MplFigure(figsize=(11, 4.2), layout="tight")
    axes = fig.subplots(1, len(PANELS))
    drawn = 0
    for color, (experiment, method_key) in zip(colors, figure.curves):
        curves = list(seed_curves(out, experiment, method_key).values())
        if not curves:
            continue
        drawn += 1
        label = f"{find_method(experiment, method_key).label} ({len(curves)} seed{'s' if len(curves) > 1 else ''})"
        for ax, (metric, _) in zip(axes, PANELS):
            if figure.wall:
                draw_seeds(ax, curves, metric, label, color)
            else:
                draw_mean_std(ax, merge(curves), metric, label, color)
    if not drawn:
        return None
    for ax, (_, ylabel) in zip(axes, PANELS):
        ax.set(xlabel="wall-clock time [s]" if figure.wall else "epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(figure.title)
    path = Path(out) / f"{figure.name}.png"
    fig.savefig(path, dpi=110)
    return path


def plot_all(out: Path) -> list[Path]:
    """Every figure with data; returns the PNGs written."""
    return [path for figure in FIGURES if (path := plot_figure(figure, out)) is not None]
