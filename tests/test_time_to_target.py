"""bench/time_to_target.py's code path on synthetic data and a tiny model (no timing asserted)."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import time_to_target as ttt  # noqa: E402
from hbpc.data import ImageData  # noqa: E402

MODEL = '''
import torch
from torch import nn


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Sigmoid(), nn.Linear(8, 3))


example_input = torch.zeros(2, 1, 4, 4)
loss_fn = nn.CrossEntropyLoss()
'''


def synthetic(n, seed):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 4, 4, generator=generator)
    return ImageData(images, images.reshape(n, -1)[:, :3].argmax(1))


def test_interleaved_runs_reach_or_miss_the_target_and_fill_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(ttt, "EVAL_SECONDS", 0.0)  # evaluate after every step
    path = tmp_path / "tiny.py"
    path.write_text(MODEL)
    sweep = [ttt.Config("SGD", "lr 0.5", "sgd", dict(lr=0.5)), ttt.Config("Adam", "lr 0.05", "adam", dict(lr=0.05)),
             ttt.Config("KFAC", "defaults", "kfac"), ttt.Config("Newton-CG (defaults)", "closure", "newton", closure=True)]
    data = (synthetic(256, 0), synthetic(128, 1))
    reachable = ttt.Problem("tiny", "tiny MLP", path, 32, 0.45, budget=60.0, max_steps=100, why="smoke test")
    runs = ttt.run_problem(reachable, data, 128, 1.0, sweep=sweep, progress=False)
    assert [r.stopped for r in runs if r.config.optimizer == "adam"] == ["target"]
    assert all(r.stopped in ("target", "max steps") or r.stopped.startswith("over") for r in runs)
    assert all((r.reached is None) == (r.stopped != "target") for r in runs)
    again = ttt.run_problem(reachable, data, 128, 1.0, seed=1, sweep=sweep, progress=False)
    lines = ttt.table(reachable, {0: runs, 1: again})
    rows = [line for line in lines if line.startswith("| Adam |")]
    assert rows[0].split("|")[5].strip() == "1.00x"
    assert len([line for line in lines if line.startswith("| ")]) == 2 + 3 * len(sweep)
    adam = [r for r in runs + again if r.config.optimizer == "adam"]
    assert rows[0].split("|")[3].strip() == f"{sorted(r.reached[0] for r in adam)[0] / 2 + sorted(r.reached[0] for r in adam)[1] / 2:.1f}"

    unreachable = ttt.Problem("tiny", "tiny MLP", path, 32, 1.01, budget=60.0, max_steps=3, why="smoke test")
    runs = ttt.run_problem(unreachable, data, 128, 1.0, sweep=sweep[:2], progress=False)
    assert [(r.stopped, r.steps) for r in runs] == [("max steps", 3)] * 2
    assert "not reached (max steps" in "\n".join(ttt.table(unreachable, {0: runs}))


def test_every_run_of_a_problem_sees_the_same_batches():
    images, labels = torch.randn(10, 1, 2, 2), torch.arange(10)
    first = [y.tolist() for _, (_, y) in zip(range(7), ttt.batch_stream(images, labels, 3, seed=4))]
    second = [y.tolist() for _, (_, y) in zip(range(7), ttt.batch_stream(images, labels, 3, seed=4))]
    assert first == second and len({tuple(y) for y in first[:3]}) == 3
