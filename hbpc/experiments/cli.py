"""``hbpc-experiments``: run the HBP paper's experiments, resume them, time them, plot them.

    hbpc-experiments all [--profile here|paper]    # the four experiments, then plot
    hbpc-experiments exp01|exp02|exp08|exp09        # one experiment (exp02 also runs exp01's SGD)
    hbpc-experiments plot                           # merged CSVs, figures, RESULTS.md from finished runs
    hbpc-experiments status                         # which runs are done
    hbpc-experiments timing                         # seconds per step and per log, estimated total

Errors (missing data, changed settings) exit with status 2 and one message; Ctrl-C exits with 130 and
a rerun of the same command resumes (finished runs are kept, the interrupted one starts again).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hbpc.data import CorruptDataFile, DatasetMissing
from hbpc.errors import HbpcError
from hbpc.experiments import plots, results, runner, timing
from hbpc.experiments.protocols import DATASETS, EXPERIMENTS, PROFILES
from hbpc.experiments.setup import SetupError

DEFAULT_OUT = {"fashion-mnist": "results", "cifar10": "results-cifar10"}
RESULTS_FILE = "RESULTS.md"
SIZE_OPTIONS = ("epochs", "logs_per_epoch", "train_samples", "train_eval_samples", "test_samples")


def seeds(text: str) -> tuple[int, ...]:
    """``0,3,5`` or ``0-4`` (inclusive) or a mix, as seeds."""
    found = []
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            found += range(int(low), int(high or low) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed list like 0,1,2 or 0-9") from None
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} names no seed")
    return tuple(dict.fromkeys(found))


ALL = "all"  # a sample option's value for "the whole set" (the sizes store it as None)


def samples(text: str) -> int | str:
    """A positive sample count, or ``all``."""
    if text == ALL:
        return ALL
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive number nor 'all'")
    return int(text)


def positive(text: str) -> int:
    """A positive int."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return int(text)


def add_common(p: argparse.ArgumentParser) -> None:
    """Options every subcommand takes: where results go."""
    p.add_argument("--dataset", choices=DATASETS, default="fashion-mnist",
                   help="fashion-mnist (default) or cifar10 (the paper's models unchanged)")
    p.add_argument("--out", type=Path,
                   help=f"results folder (default: {DEFAULT_OUT['fashion-mnist']}/, for cifar10 "
                        f"{DEFAULT_OUT['cifar10']}/)")


def add_plan_options(p: argparse.ArgumentParser) -> None:
    """Options that choose the runs: dataset, output, profile and the sizes that override it."""
    add_common(p)
    p.add_argument("--profile", choices=sorted(PROFILES), default="here",
                   help="here: the whole suite in ~50 min on 2 cores (default); paper: the paper's sizes")
    p.add_argument("--seeds", type=seeds, help="seeds instead of the profile's, e.g. 0-9 or 0,1")
    p.add_argument("--epochs", type=positive, help="epochs of every experiment instead of the profile's")
    p.add_argument("--logs-per-epoch", type=positive, help="logs per epoch instead of the profile's")
    p.add_argument("--train-samples", type=samples,
                   help="random training subset per seed, one epoch is one pass over it (number or all)")
    p.add_argument("--train-eval-samples", type=samples, help="training samples evaluated at each log")
    p.add_argument("--test-samples", type=samples, help="test samples evaluated at each log (number or all)")
    p.add_argument("--methods", nargs="+", metavar="METHOD", help="only these methods (keys as in `status`)")
    p.add_argument("--batch-size", type=positive,
                   help="replace every method's batch size (quick checks only; the paper's are in the protocol)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options of the commands that train: the runs, the data folder and the threads."""
    add_plan_options(p)
    p.add_argument("--data-dir", help="folder with the dataset files (default: the loader's standard places)")
    p.add_argument("--threads", type=positive, default=2, help="torch CPU threads (default: %(default)s)")


def parser() -> argparse.ArgumentParser:
    """The ``hbpc-experiments`` argument parser."""
    top = argparse.ArgumentParser(prog="hbpc-experiments", description=__doc__.splitlines()[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="Profiles: " + "; ".join(f"{p.name}: {p.note}" for p in PROFILES.values()))
    commands = top.add_subparsers(dest="command", required=True)
    experiments = [commands.add_parser(key, help=e.title) for key, e in EXPERIMENTS.items()]
    experiments.append(commands.add_parser("all", help="run exp01, exp02, exp08 and exp09, then plot"))
    for command in experiments:
        add_run_options(command)
        command.add_argument("--overwrite", action="store_true",
                             help="recompute finished runs whose settings differ instead of stopping")
    status = commands.add_parser("status", help="list the runs of a profile and whether they are done")
    add_plan_options(status)
    status.add_argument("experiments", nargs="*", metavar="EXPERIMENT", help="default: all four")
    timing_parser = commands.add_parser("timing", help="seconds per step and per log of every method, and "
                                                       "the estimated total of the profile")
    add_run_options(timing_parser)
    timing_parser.add_argument("experiments", nargs="*", metavar="EXPERIMENT", help="default: all four")
    timing_parser.add_argument("--steps", type=positive, default=3, help="timed steps per method (default: 3)")
    add_common(commands.add_parser("plot", help="merge seeds, write the figures and RESULTS.md"))
    return top


def out_folder(args) -> Path:
    """``--out`` or the dataset's default folder."""
    return args.out if args.out is not None else Path(DEFAULT_OUT[args.dataset])


def chosen(args) -> list[str]:
    """The positional experiments of ``status``/``timing``, all four when none are named."""
    unknown = [key for key in args.experiments if key not in EXPERIMENTS]
    if unknown:
        raise SetupError(f"no experiment {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    return args.experiments or list(EXPERIMENTS)


def planned(args, experiments: list[str]) -> list[runner.Run]:
    """The runs the options ask for."""
    given = {name: getattr(args, name) for name in SIZE_OPTIONS if getattr(args, name) is not None}
    overrides = {name: None if value == ALL else value for name, value in given.items()}
    known = {m.key for key in experiments for m in EXPERIMENTS[key].methods}
    known |= {method for key in experiments for _, method in EXPERIMENTS[key].borrowed}
    unknown = set(args.methods or ()) - known
    if unknown:
        raise SetupError(f"no method {', '.join(sorted(unknown))} in {', '.join(experiments)}; "
                         "`hbpc-experiments status` lists them")
    return runner.plan(experiments, PROFILES[args.profile], args.dataset, args.seeds, overrides, args.methods,
                       args.batch_size)


def workspace(args) -> runner.Workspace:
    """The workspace of the options, with torch's thread count set."""
    torch.set_num_threads(args.threads)
    return runner.Workspace(out_folder(args), args.dataset, args.data_dir, args.profile)


def run_experiments(args, experiments: list[str]) -> None:
    """Train the runs of ``experiments`` that are not done."""
    runs = planned(args, experiments)
    runner.execute_all(runs, workspace(args), args.overwrite)
    print(f"{len(runs)} runs of {', '.join(experiments)} are in {out_folder(args)}/")


def plot(args) -> None:
    """Merged CSVs, the figures and ``RESULTS.md`` from the finished runs in the output folder."""
    out = out_folder(args)
    if not out.is_dir():
        raise SetupError(f"{out}/ does not exist: run an experiment first (e.g. hbpc-experiments all)")
    results.merge_all(out)
    written = plots.plot_all(out)
    (out / RESULTS_FILE).write_text(results.table(out))
    print("wrote " + ", ".join(str(p) for p in [*written, out / RESULTS_FILE]))


def status(args) -> None:
    """One line per planned run: done or to do."""
    runs = planned(args, chosen(args))
    out = out_folder(args)
    states = [runner.state(run, out) for run in runs]
    for run, state in zip(runs, states):
        print(f"{state:<5} {run.name}  ({run.method.label}, batch {run.method.batch_size})")
    print(f"{states.count('done')} of {len(runs)} runs done in {out}/"
          + (f"; {states.count('other')} finished with other settings" if "other" in states else ""))


def time_methods(args) -> None:
    """Print (and write to ``OUT/timing.md``) the measured costs and the estimated total."""
    space = workspace(args)
    costs = timing.measure_all(planned(args, chosen(args)), space, args.steps)
    text = timing.report(costs, args.profile)
    space.out.mkdir(parents=True, exist_ok=True)
    (space.out / "timing.md").write_text(text + "\n")
    print(text)


def dispatch(args) -> None:
    """Run the subcommand."""
    if args.command in EXPERIMENTS:
        run_experiments(args, [args.command])
    elif args.command == "all":
        run_experiments(args, list(EXPERIMENTS))
        plot(args)
    elif args.command == "plot":
        plot(args)
    elif args.command == "status":
        status(args)
    else:
        time_methods(args)


def main(argv=None) -> int:
    """Run ``hbpc-experiments`` with ``argv``; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        dispatch(args)
    except (DatasetMissing, CorruptDataFile, SetupError, HbpcError) as error:
        print(f"hbpc-experiments: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nhbpc-experiments: interrupted; rerun the same command to resume (finished runs are kept)",
              file=sys.stderr)
        return 130
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
