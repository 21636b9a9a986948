"""Per-step time and progress of NewtonCG's options on Fashion-MNIST (the FCNN and CNNs).

    .venv/bin/python -m bench.newton_cg_speed --model fcnn --steps 100 --batch 128
    .venv/bin/python -m bench.newton_cg_speed --model cnn --configs defaults,paper,adam

Every configuration trains the same initial model on the same batches (seed 0) for ``--steps``
steps and reports seconds per step (median), the training loss at the start and over the last 10
steps, the test loss and accuracy on ``--test`` images after training, and the whole run's time.
``closure`` configurations call ``step(closure)`` (loss checks, backtracking), the others
``forward_backward(x, y); step()``. Times are wall clock on this machine with ``--threads``
threads: compare rows of one run, never across machines or runs.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

from hbpc.data import load_fashion_mnist
from hbpc.optim import PAPER, NewtonCG, SubsampledCurvature

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"fcnn": "fcnn_fashion_mnist", "cnn": "cnn_fashion_mnist", "c4d3": "c4d3_fashion_mnist",
          "mlp": "mlp_fashion_mnist"}

# name: (optimizer, options, closure); "subsample" is SubsampledCurvature's size, "compile" torch.compile
CONFIGS = {
    "adam": ("adam", dict(lr=1e-3), False),
    "adam-3e-3": ("adam", dict(lr=3e-3), False),
    "sgd": ("sgd", dict(lr=0.1, momentum=0.9), False),
    "paper": ("newton", dict(PAPER, curvature="pch-abs", lr=0.1, alpha=0.02, cg_maxiter=50), False),
    "defaults": ("newton", dict(), True),
    "defaults-plain": ("newton", dict(), False),
    "warm-start": ("newton", dict(warm_start=True), True),
    "no-line-search": ("newton", dict(line_search=False), True),
    "no-checks": ("newton", dict(max_backtracks=None), True),
    "diagonal": ("newton", dict(preconditioner="diagonal"), True),
    "kronecker": ("newton", dict(preconditioner="kronecker"), True),
    "pch-abs": ("newton", dict(curvature="pch-abs"), True),
    "kfra-blocks": ("newton", dict(average_parameter_jacobian=False), True),
    "kfra-direct": ("newton", dict(average_parameter_jacobian=False, solver="direct"), True),
    "cg5": ("newton", dict(cg_maxiter=5), True),
    "cg10": ("newton", dict(cg_maxiter=10), True),
    "cg20": ("newton", dict(cg_maxiter=20), True),
    "cg100": ("newton", dict(cg_maxiter=100), True),
    "products": ("newton", dict(source="block_products", cg_maxiter=10), True),
    "compiled": ("newton", dict(compile=True), True),
    "products-kronecker": ("newton", dict(source="block_products", cg_maxiter=10, preconditioner="kronecker"), True),
    "products-diagonal": ("newton", dict(source="block_products", cg_maxiter=10, preconditioner="diagonal"), True),
    "full": ("newton", dict(source="full", cg_maxiter=10), True),
    "full-kronecker": ("newton", dict(source="full", cg_maxiter=10, preconditioner="kronecker"), True),
    "subsample-1/4": ("newton", dict(subsample=0.25), True),
    "products-subsample-1/4": ("newton", dict(source="block_products", cg_maxiter=10, subsample=0.25), True),
    "full-subsample-1/4": ("newton", dict(source="full", cg_maxiter=10, subsample=0.25), True),
}


def configuration(config: str) -> tuple[str, dict, bool]:
    """``CONFIGS[base]`` for ``base+key=value+...``, with each ``value`` (a Python literal) overriding."""
    base, *overrides = config.split("+")
    kind, options, use_closure = CONFIGS[base]
    options = dict(options)
    for override in overrides:
        key, value = override.split("=", 1)
        options[key] = ast.literal_eval(value)
    return kind, options, use_closure


def load(path: Path, name: str):
    """Import a file as a module (registered in ``sys.modules``, where ``torch.compile`` looks its globals up)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


COMPILED = ("forward_backward", "ggn_vector_product")  # a default step's hot calls (blocks() runs every 5 steps)


def compiled_products(curvature) -> None:
    """Replace the generated module's ``COMPILED`` methods on ``curvature`` by ``torch.compile``d ones."""
    for name in COMPILED:
        setattr(curvature, name, torch.compile(getattr(curvature, name), dynamic=False))


def run(model_key: str, config: str, steps: int, batch: int, test_count: int, data) -> dict:
    """Train one configuration; return its figures."""
    kind, options, use_closure = configuration(config)
    spec = load(ROOT / "examples" / "models" / f"{MODELS[model_key]}.py", f"model_{model_key}")
    model = spec.build_model() if hasattr(spec, "build_model") else spec.model
    loss_fn = spec.loss_fn
    train, test = data
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(train.images.shape[0], generator=generator)
    subsample, use_compile = options.pop("subsample", None), options.pop("compile", False)
    if kind == "newton":
        generated = load(ROOT / "examples" / "generated" / f"{MODELS[model_key]}.py", f"generated_{model_key}")
        curvature = generated.Curvature(model)
        if use_compile:
            compiled_products(curvature)
        if subsample:
            curvature = SubsampledCurvature(curvature, subsample)
        optimizer = NewtonCG(model.parameters(), curvature, **options)
    else:
        make = torch.optim.Adam if kind == "adam" else torch.optim.SGD
        optimizer = make(model.parameters(), **options)
    losses, times = [], []
    start = time.perf_counter()
    for step in range(steps):
        index = order[(step * batch) % len(order):][:batch]
        x, y = train.images[index], train.labels[index]
        tick = time.perf_counter()
        optimizer.zero_grad()
        if kind != "newton":
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        elif use_closure:
            loss = optimizer.step(lambda: curvature.forward_backward(x, y))
        else:
            loss = curvature.forward_backward(x, y)
            optimizer.step()
        times.append(time.perf_counter() - tick)
        losses.append(float(loss))
    total = time.perf_counter() - start
    with torch.no_grad():
        logits = model(test.images[:test_count])
        test_loss = float(loss_fn(logits, test.labels[:test_count]))
        accuracy = float((logits.argmax(1) == test.labels[:test_count]).float().mean())
    alpha = optimizer.param_groups[0].get("alpha")
    return dict(config=config, step_s=statistics.median(times[1:] or times), first=losses[0],
                last10=sum(losses[-10:]) / len(losses[-10:]), test_loss=test_loss, accuracy=accuracy, total_s=total,
                alpha=alpha)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="fcnn")
    parser.add_argument("--configs", default="adam,paper,defaults,defaults-plain",
                        help=f"comma-separated, from: {', '.join(CONFIGS)}; "
                             "NAME+key=value+... overrides options (e.g. products+lr=0.3)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = (load_fashion_mnist(split="train"), load_fashion_mnist(split="test"))
    print(f"{args.model}, {args.steps} steps of batch {args.batch}, {args.threads} threads")
    print(f"| config | s/step | loss first | loss last 10 | test loss | test acc | total s | alpha |")
    print("|---|---|---|---|---|---|---|---|")
    for config in args.configs.split(","):
        r = run(args.model, config, args.steps, args.batch, args.test, data)
        alpha = "" if r["alpha"] is None else f"{r['alpha']:.3g}"
        print(f"| {config} | {r['step_s']:.3f} | {r['first']:.3f} | {r['last10']:.3f} | {r['test_loss']:.3f} | "
              f"{r['accuracy']:.3f} | {r['total_s']:.1f} | {alpha} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
