"""hbpc-experiments on tiny synthetic Fashion-MNIST / CIFAR-10 files: every protocol runs, runs resume,
seeds merge correctly, figures and the table are written, and missing data give one clear error."""

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from hbpc.experiments import cli, plots, results, runner, setup
from hbpc.experiments.protocols import EXPERIMENTS, PAPER, PROFILES, Profile, Sizes
from test_data import tiny_cifar, tiny_mnist, write_idx_pair

TINY = Profile("tiny", (0,), {key: Sizes(epochs=1, logs_per_epoch=4, train_samples=40, train_eval_samples=8,
                                         test_samples=8) for key in EXPERIMENTS})
TINY_OPTIONS = ["--epochs", "1", "--logs-per-epoch", "4", "--train-samples", "40", "--train-eval-samples", "8",
                "--test-samples", "8", "--batch-size", "8", "--seeds", "0"]


@pytest.fixture(autouse=True)
def keep_threads():
    """The CLI sets torch's thread count (--threads); restore the suite's afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    """A folder with 64 training and 16 test images in Fashion-MNIST's IDX format."""
    directory = tmp_path_factory.mktemp("fashion")
    write_idx_pair(directory, "train", *tiny_mnist(64, 0), compress=True)
    write_idx_pair(directory, "t10k", *tiny_mnist(16, 1), compress=False)
    return directory


def quick(run: runner.Run) -> runner.Run:
    """``run`` with CG capped at 3 iterations per solve, so that a smoke step takes milliseconds."""
    hyper = {k: (min(v, 3) if k == "cg_maxiter" else v) for k, v in run.method.hyper.items()}
    return dataclasses.replace(run, method=dataclasses.replace(run.method, hyper=hyper))


def read_rows(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_every_protocol_trains_and_logs(experiment, fashion_dir, tmp_path):
    runs = [quick(r) for r in runner.plan([experiment], TINY, "fashion-mnist", batch_size=8)]
    workspace = runner.Workspace(tmp_path, "fashion-mnist", fashion_dir, "tiny")
    assert runner.execute_all(runs, workspace) == runs
    for run in runs:
        rows = read_rows(run.csv_path(tmp_path))
        meta = json.loads(run.meta_path(tmp_path).read_text())
        assert meta["status"] == "finished" and meta["settings"] == run.settings()
        # 5 batches per epoch, 4 logs per epoch: a log after every batch (idx % 1 == 0), as the paper's CVP runs
        assert [int(r["step"]) for r in rows] == [8, 16, 24, 32, 40]
        assert [float(r["epoch"]) for r in rows] == [0.2, 0.4, 0.6, 0.8, 1.0]
        assert float(rows[0]["wall"]) == 0.0 and list(rows[0]) == list(runner.COLUMNS)
        assert all(math.isfinite(float(v)) for r in rows for v in r.values())
    if experiment != "exp01":  # exp02 borrows exp01's SGD
        assert {r.experiment.key for r in runs} == {experiment, *(e for e, _ in EXPERIMENTS[experiment].borrowed)}


def test_log_interval_follows_the_paper():
    assert runner.log_interval(100, 1) == 100  # one log per epoch, after the first batch
    assert runner.log_interval(50, 4) == 12  # CIFAR-10 at batch 1000: idx 0, 12, 24, 36, 48, five logs
    assert runner.log_interval(3, 4) == 1


def test_second_invocation_does_not_recompute(fashion_dir, tmp_path, monkeypatch):
    argv = ["exp01", "--methods", "sgd", "--data-dir", str(fashion_dir), "--out", str(tmp_path), *TINY_OPTIONS]
    assert cli.main(argv) == 0
    csv_path = tmp_path / "exp01" / "sgd" / "seed0.csv"
    before = csv_path.read_text()
    monkeypatch.setattr(runner, "execute", lambda *a, **k: pytest.fail("a finished run was recomputed"))
    assert cli.main(argv) == 0
    assert csv_path.read_text() == before


def test_interrupted_run_restarts_cleanly(fashion_dir, tmp_path, monkeypatch, capsys):
    argv = ["exp01", "--methods", "sgd", "ggn", "--data-dir", str(fashion_dir), "--out", str(tmp_path),
            *TINY_OPTIONS]
    make_update = setup.make_update

    def interrupted(method, *args):
        update = make_update(method, *args)
        if method.key != "ggn":
            return update
        calls = []

        def update_then_interrupt(x, y):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return update(x, y)
        return update_then_interrupt

    monkeypatch.setattr(setup, "make_update", interrupted)
    assert cli.main(argv) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    ggn = tmp_path / "exp01" / "ggn"
    assert (ggn / "seed0.csv.part").is_file() and not (ggn / "seed0.json").exists()
    sgd_csv = (tmp_path / "exp01" / "sgd" / "seed0.csv").read_text()

    monkeypatch.setattr(setup, "make_update", make_update)
    assert cli.main(argv) == 0
    assert len(read_rows(ggn / "seed0.csv")) == 5 and (ggn / "seed0.json").is_file()
    assert not (ggn / "seed0.csv.part").exists()
    assert (tmp_path / "exp01" / "sgd" / "seed0.csv").read_text() == sgd_csv


def test_changed_settings_stop_unless_overwrite(fashion_dir, tmp_path, capsys):
    argv = ["exp01", "--methods", "sgd", "--data-dir", str(fashion_dir), "--out", str(tmp_path), *TINY_OPTIONS]
    assert cli.main(argv) == 0
    assert cli.main([*argv, "--epochs", "2"]) == 2
    assert "epochs differ" in capsys.readouterr().err
    assert cli.main(["status", "exp01", "--methods", "sgd", "--out", str(tmp_path), *TINY_OPTIONS, "--epochs", "2"]) == 0
    assert "other exp01/sgd/seed0" in capsys.readouterr().out
    assert cli.main([*argv, "--epochs", "2", "--overwrite"]) == 0
    assert len(read_rows(tmp_path / "exp01" / "sgd" / "seed0.csv")) == 10


def test_all_samples_option_overrides_the_profile_subset(fashion_dir, tmp_path):
    options = [o if o != "40" else "all" for o in TINY_OPTIONS]  # --train-samples all: the 64 images
    assert cli.main(["exp01", "--methods", "sgd", "--data-dir", str(fashion_dir), "--out", str(tmp_path), *options]) == 0
    meta = json.loads((tmp_path / "exp01" / "sgd" / "seed0.json").read_text())
    assert meta["settings"]["train_samples"] is None
    # 8 batches of 8, logs after batches 0, 2, 4, 6 (the 40-image subset would give 5 batches)
    assert [int(r["step"]) for r in read_rows(tmp_path / "exp01" / "sgd" / "seed0.csv")] == [8, 24, 40, 56]


def test_non_finite_loss_stops_the_run(fashion_dir, tmp_path, monkeypatch):
    losses = iter([2.0, 1.5, math.nan, 1.0, 1.0])
    monkeypatch.setattr(setup, "make_update", lambda *args: lambda x, y: next(losses))
    run = runner.plan(["exp01"], TINY, "fashion-mnist", methods=["sgd"], batch_size=8)[0]
    meta = runner.execute(run, runner.Workspace(tmp_path, "fashion-mnist", fashion_dir))
    assert meta["status"] == "diverged" and meta["samples"] == 24
    assert [r["batch_loss"] for r in read_rows(run.csv_path(tmp_path))] == ["2.0", "1.5"]


def test_merge_mean_and_sample_std_on_step():
    first = {"step": np.array([10.0, 20.0, 30.0]), "epoch": np.array([0.5, 1.0, 1.5])}
    second = {"step": np.array([10.0, 20.0]), "epoch": np.array([0.5, 1.0])}
    third = {"step": np.array([10.0, 20.0]), "epoch": np.array([0.5, 1.0])}
    for i, curve in enumerate((first, second, third)):
        for j, metric in enumerate(results.METRICS):
            curve[metric] = (i + 1) * (j + 1) * curve["step"]
    merged = results.merge([first, second, third])
    assert merged["step"].tolist() == [10, 20, 30] and merged["n"].tolist() == [3, 3, 1]
    assert merged["epoch"].tolist() == [0.5, 1.0, 1.5]
    for j, metric in enumerate(results.METRICS):
        at_10 = np.array([1, 2, 3]) * (j + 1) * 10.0
        assert merged[f"{metric}_mean"][0] == pytest.approx(at_10.mean())
        assert merged[f"{metric}_std"][0] == pytest.approx(at_10.std(ddof=1))
        assert merged[f"{metric}_mean"][2] == pytest.approx((j + 1) * 30.0)  # only the first seed reached step 30
        assert merged[f"{metric}_std"][2] == 0.0


def fake_run(out, experiment, method, seed, shift):
    """A finished run's CSV and JSON with made-up values."""
    run = runner.plan([experiment], TINY, "fashion-mnist", seeds=(seed,), methods=[method])[0]
    run.csv_path(out).parent.mkdir(parents=True, exist_ok=True)
    with run.csv_path(out).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, runner.COLUMNS)
        writer.writeheader()
        for k in range(1, 4):
            writer.writerow(dict(step=10 * k, epoch=k / 4, wall=k, batch_loss=2 / k + shift, train_loss=2 / k + shift,
                                 train_acc=0.2 * k, test_loss=2 / k, test_acc=0.2 * k + shift))
    runner.write_json(run.meta_path(out), dict(settings=run.settings(), profile="tiny", status="finished",
                                               samples=30, seconds=1.5, machine=setup.machine()))


def test_plot_writes_every_figure_merged_csvs_and_the_table(tmp_path):
    for figure in plots.FIGURES:
        for experiment, method in figure.curves:
            for seed, shift in ((0, 0.0), (1, 0.1)):
                fake_run(tmp_path, experiment, method, seed, shift)
    assert cli.main(["plot", "--out", str(tmp_path)]) == 0
    for figure in plots.FIGURES:
        assert (tmp_path / f"{figure.name}.png").stat().st_size > 10_000
    merged = read_rows(tmp_path / "exp08" / "merged" / "kfac.csv")
    assert float(merged[-1]["test_acc_mean"]) == pytest.approx(0.65)
    table = (tmp_path / "RESULTS.md").read_text()
    assert "| GGN, α1 | 2 | 0.7167 ± 0.0707 | 0.6500 ± 0.0707 | 0 | 2 |" in table
    assert "Profile: tiny" in table and "nproc" in table and "total wall time" in table


def test_plot_without_results_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["plot", "--out", str(tmp_path / "none")]) == 2
    assert "run an experiment first" in capsys.readouterr().err


def test_missing_fashion_mnist_is_a_clear_error(tmp_path, capsys):
    argv = ["exp01", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), *TINY_OPTIONS]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Fashion-MNIST not found" in err and "Traceback" not in err


def test_missing_cifar10_is_a_clear_error(tmp_path, capsys):
    argv = ["exp08", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"),
            *TINY_OPTIONS]
    assert cli.main(argv) == 2
    assert "CIFAR-10 not found" in capsys.readouterr().err


def test_cifar10_path_runs_the_original_model(tmp_path):
    tiny_cifar(tmp_path / "cifar", n=8)
    argv = ["exp01", "--dataset", "cifar10", "--methods", "sgd", "--data-dir", str(tmp_path / "cifar"),
            "--out", str(tmp_path / "out"), *TINY_OPTIONS]
    assert cli.main(argv) == 0
    meta = json.loads((tmp_path / "out" / "exp01" / "sgd" / "seed0.json").read_text())
    assert meta["settings"]["model"] == "fcnn_cifar10.py" and meta["status"] == "finished"


def test_profiles_hold_the_papers_sizes_and_hyper_parameters():
    assert PAPER.seeds == tuple(range(10)) and set(PROFILES) == {"here", "paper"}
    assert [PAPER.sizes[k].epochs for k in ("exp01", "exp02", "exp08", "exp09")] == [100, 100, 20, 20]
    assert all(s.train_samples is None and s.test_samples is None for s in PAPER.sizes.values())
    exp08 = EXPERIMENTS["exp08"]
    assert exp08.method("kfac").batch_size == 500 and exp08.method("ggn-alpha1").hyper["alpha"] == 1e-4
    assert [m.hyper["split"] for m in EXPERIMENTS["exp02"].methods] == [1, 2, 4, 16]


def test_bad_options_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["exp01", "--seeds", "x"])
    assert "seed list" in capsys.readouterr().err
    assert cli.main(["status", "exp03", "--out", str(tmp_path)]) == 2
    assert cli.main(["exp01", "--methods", "lbfgs", "--out", str(tmp_path)]) == 2
    assert "no method lbfgs" in capsys.readouterr().err


def test_status_and_timing(fashion_dir, tmp_path, capsys):
    common = ["--out", str(tmp_path), *TINY_OPTIONS]
    data = ["--data-dir", str(fashion_dir), "--threads", "1"]
    assert cli.main(["exp02", "--methods", "sgd", *common, *data]) == 0  # exp02 borrows exp01's SGD
    capsys.readouterr()
    assert cli.main(["status", "exp02", *common]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "done  exp01/sgd/seed0  (SGD, batch 8)" in lines
    assert "todo  exp02/pch-abs-split16/seed0  (16 blocks, batch 8)" in lines
    assert cli.main(["timing", "exp01", "--methods", "sgd", "pch-abs", "--steps", "1", *common, *data]) == 0
    report = (tmp_path / "timing.md").read_text()
    assert "| exp01 | pch-abs | 8 |" in report and "Estimated total" in report
