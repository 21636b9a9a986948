"""KFAC on exp08's sigmoid c4d3 (Fashion-MNIST): does it leave the plateau at chance, against SGD and Adam?

    .venv/bin/python -m bench.kfac_plateau --steps 60 --configs kfac,kfac-paper,sgd
    .venv/bin/python -m bench.kfac_plateau --steps 200 --configs adam,sgd

A shortened exp08 protocol: ``examples/models/c4d3_fashion_mnist.py`` (seeded default initialization), batch
``--batch`` (128) from one seeded shuffle shared by every configuration, test accuracy on the first
``--test`` test images every ``--every`` steps. Configurations (``CONFIGS``): ``KFAC(params, curv)`` with
its defaults, the paper's KFAC as exp08 runs it (KL-clipped heavy ball, absolute damping; batch as given
here, not exp08's 500), and SGD and Adam with exp08's hyper-parameters. Times are training seconds on a
possibly shared machine: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "models" / "c4d3_fashion_mnist.py"


def configs() -> dict[str, tuple[str, dict]]:
    """name: (optimizer, keyword arguments)."""
    from hbpc.experiments.protocols import EXP08

    return {
        "kfac": ("kfac", {}),
        "kfac-paper": ("kfac", dict(EXP08.method("kfac").hyper)),
        "sgd": ("sgd", dict(EXP08.method("sgd").hyper)),
        "adam": ("adam", dict(EXP08.method("adam").hyper)),
    }


def train(name: str, optimizer: str, options: dict, initial, spec, generated, data, args) -> list[tuple]:
    """(step, seconds, batch loss, test accuracy) every ``args.every`` steps."""
    from bench.time_to_target import accuracy, batch_stream
    from hbpc.optim import KFAC

    (images, labels), (test_images, test_labels) = data
    model = copy.deepcopy(initial)
    curvature = generated.Curvature(model) if optimizer == "kfac" else None
    if optimizer == "kfac":
        opt = KFAC(model.parameters(), curvature, generator=torch.Generator().manual_seed(0), **options)
    else:
        opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(model.parameters(), **options)
    batches = batch_stream(images, labels, args.batch, 0)
    rows, seconds = [], 0.0
    for step in range(1, args.steps + 1):
        x, y = next(batches)
        start = time.perf_counter()
        opt.zero_grad()
        if curvature is None:
            loss = spec.loss_fn(model(x), y)
            loss.backward()
        else:
            loss = curvature.forward_backward(x, y)
        opt.step()
        seconds += time.perf_counter() - start
        if step % args.every == 0 or step == args.steps:
            rows.append((step, seconds, float(loss.detach()), accuracy(model, test_images, test_labels)))
            print(f"  {name:10s} step {step:4d}  {seconds:7.1f} s  loss {rows[-1][2]:.3f}  test accuracy "
                  f"{rows[-1][3]:.3f}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--configs", default="kfac,kfac-paper,sgd,adam")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import hbpc
    from bench.time_to_target import fashion_mnist, load_module

    data = fashion_mnist()
    if data is None:
        return 1
    train_data, test_data = data
    spec = load_module(MODEL, "kfac_plateau_model")
    initial = spec.build_model()
    generated = hbpc.compile_model(initial, spec.example_input, spec.loss_fn)
    data = ((train_data.images, train_data.labels), (test_data.images[:args.test], test_data.labels[:args.test]))
    table = {}
    for name in args.configs.split(","):
        optimizer, options = configs()[name]
        table[name] = train(name, optimizer, options, initial, spec, generated, data, args)
    steps = [step for step, *_ in next(iter(table.values()))]
    print(f"\n| configuration | " + " | ".join(f"step {s}" for s in steps) + " | s/step |")
    print("|---|" + "---|" * (len(steps) + 1))
    for name, rows in table.items():
        print(f"| {name} | " + " | ".join(f"{acc:.3f}" for *_, acc in rows) + f" | {rows[-1][1] / rows[-1][0]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
