"""Where a KFAC step's time goes, and what the step costs per configuration, on Fashion-MNIST models.

    .venv/bin/python -m bench.kfac_step --model c4d3 --batch 128 --steps 20
    .venv/bin/python -m bench.kfac_step --model fcnn --configs defaults,paper-inverses

Part 1 (one batch, median of ``--repeats``): the pieces of a step in seconds and as multiples of a
plain torch gradient (``loss.backward()``): hbpc's ``forward_backward``, the Kronecker factors, the
inverses (Cholesky of the relatively damped factors) or the eigendecompositions (absolute damping),
the directions, and the exact GGN product on one and on two vectors (the quadratic step's 2×2 model).

Part 2: seconds per step (mean over ``--steps`` steps, same batches) of each ``CONFIGS`` entry, and the
training loss after them. Times are wall clock with ``--threads`` threads on a possibly shared machine:
compare rows of one run only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"c4d3": "c4d3_fashion_mnist", "fcnn": "fcnn_fashion_mnist", "cnn": "cnn_fashion_mnist"}

# name: KFAC keyword arguments. "defaults" is KFAC(params, curv); the others change what a step computes.
CONFIGS = {
    "defaults": {},
    "factors-every-step": dict(factor_interval=1),
    "paper-inverses": dict(relative_damping=False, max_change=None),  # eigendecompositions, absolute damping
    "fixed-step": dict(step_size="fixed", lr=0.1),  # no GGN product: the paper's KL-clipped heavy ball
}


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def pieces(model, spec, curvature, x, y, repeats: int) -> dict[str, float]:
    """Median seconds of each piece of a KFAC step (defaults) on ``(x, y)``."""
    from hbpc.optim import KFAC

    optimizer = KFAC(model.parameters(), curvature, generator=torch.Generator().manual_seed(0))
    active = [(group, p) for group in optimizer.param_groups for p in group["params"]]

    def directions():
        return [-optimizer.direction(optimizer.names[p], p.grad, group["damping"]).reshape(p.shape)
                for group, p in active]

    def gradient():
        model.zero_grad()
        spec.loss_fn(model(x), y).backward()

    def eigendecompositions():
        optimizer.relative_damping = False
        optimizer.update_inverses()
        optimizer.relative_damping = True

    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        row = {"torch gradient": seconds(gradient), "forward_backward": seconds(lambda: curvature.forward_backward(x, y)),
               "factors": seconds(optimizer.update_factors), "inverses (Cholesky)": seconds(optimizer.update_inverses),
               "eigendecompositions": seconds(eigendecompositions), "directions": seconds(directions)}
        d = directions()
        row["GGN product, 1 vector"] = seconds(lambda: optimizer.damped_ggn(active, [d]))
        row["GGN product, 2 vectors"] = seconds(lambda: optimizer.damped_ggn(active, [d, d]))
        for key, value in row.items():
            times.setdefault(key, []).append(value)
    return {key: statistics.median(values) for key, values in times.items()}


def per_step(model_file: Path, spec_name: str, data, names: list[str], steps: int, batch: int) -> list[tuple]:
    """(config, s/step, loss over the last 5 steps) of every configuration, same initial model and batches."""
    import copy

    import hbpc
    from bench.time_to_target import batch_stream, load_module
    from hbpc.optim import KFAC

    spec = load_module(model_file, spec_name)
    initial = spec.build_model()
    generated = hbpc.compile_model(initial, spec.example_input, spec.loss_fn)
    rows = []
    for name in names:
        model = copy.deepcopy(initial)
        curvature = generated.Curvature(model)
        optimizer = KFAC(model.parameters(), curvature, generator=torch.Generator().manual_seed(0), **CONFIGS[name])
        batches = batch_stream(data.images, data.labels, batch, 0)
        total, losses = 0.0, []
        for _ in range(steps):
            x, y = next(batches)
            start = time.perf_counter()
            losses.append(float(curvature.forward_backward(x, y)))
            optimizer.step()
            total += time.perf_counter() - start
        rows.append((name, total / steps, statistics.mean(losses[-5:])))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="c4d3")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="steps per configuration in part 2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from: " + ", ".join(CONFIGS))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import hbpc
    from bench.time_to_target import batch_stream, fashion_mnist, load_module

    data = fashion_mnist()
    if data is None:
        return 1
    train, _ = data
    model_file = ROOT / "examples" / "models" / f"{MODELS[args.model]}.py"
    spec = load_module(model_file, "kfac_step_model")
    model = spec.build_model()
    curvature = hbpc.compile_model(model, spec.example_input, spec.loss_fn).Curvature(model)
    x, y = next(batch_stream(train.images, train.labels, args.batch, 0))
    times = pieces(model, spec, curvature, x, y, args.repeats)
    gradient = times["torch gradient"]
    print(f"## KFAC step pieces: {args.model}, batch {args.batch}, {torch.get_num_threads()} threads "
          f"(median of {args.repeats})\n\n| piece | s | x torch gradient |\n|---|---|---|")
    for key, value in times.items():
        print(f"| {key} | {value:.3f} | {value / gradient:.2f} |")
    rows = per_step(model_file, "kfac_step_steps", train, args.configs.split(","), args.steps, args.batch)
    print(f"\n## s/step over {args.steps} steps\n\n| configuration | options | s/step | x torch gradient | "
          "loss (last 5 steps) |\n|---|---|---|---|---|")
    for name, step, loss in rows:
        print(f"| {name} | {CONFIGS[name] or 'KFAC(params, curv)'} | {step:.3f} | {step / gradient:.1f} | {loss:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
