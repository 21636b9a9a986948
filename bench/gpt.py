"""``python -m bench.gpt``: the 2-layer causal GPT (examples/models/gpt_char.py, d = 32, 97 tokens) at N = 8, T = 64.

In one process, interleaved with the autograd gradient (median of the repetitions, as ``bench.worker``):

* the full GGN- and Hessian-vector products of hbpc, curvlinops and torch.func (``bench.impls``), as × one gradient:
  hbpc's ``forward_backward`` (which also computes the gradient) is its setup, each product a "vector";
  the peers re-run the forward pass in every product;
* Kronecker factors of every Linear layer shared over the tokens, KFAC-expand and KFAC-reduce, hbpc's
  ``kronecker_factors`` against curvlinops' ``KFACLinearOperator.compute_kronecker_factors``: both Monte-Carlo
  (one sampled label per token, ``kind="kfac"`` / ``fisher_type="mc"``). hbpc's exact per-token root (``kflr``)
  backpropagates T·C columns per sample (6,208 here) and is not timed: curvlinops' ``type-2`` backpropagates C
  columns shared by all tokens, another quantity.

Writes bench/RESULTS-gpt.md. Timings on a shared machine are noisy: compare rows of one run only.
"""
import argparse
import math
import os
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import hbpc
from bench.impls import Curvlinops, Hbpc, TorchFunc, _zero_grad
from bench.worker import interleaved, median
from hbpc.export import load_model_file

ROOT = Path(__file__).resolve().parents[1]


_NO_DEADLINE = SimpleNamespace(left=lambda: math.inf)  # bench/worker's Deadline, never reached


def _interleave(gradient, phases, reps):
    """Median seconds of one gradient and of each phase, over ``reps`` alternating rounds."""
    grad_times, times = interleaved(gradient, phases, budget=0.0, deadline=_NO_DEADLINE, min_reps=reps, max_reps=reps)
    return median(grad_times), {name: median(t) for name, t in times.items()}


def _kfac_peer(model, loss_fn, x, y, approx, fisher_type, params):
    from curvlinops import KFACLinearOperator

    def run():
        operator = KFACLinearOperator(model, loss_fn, params, [(x, y)], fisher_type=fisher_type,
                                      mc_samples=1, kfac_approx=approx, check_deterministic=False)
        operator.compute_kronecker_factors()
    return run


def _kfac_hbpc(curvature_class, model, x, y, approx, kind):
    def run():
        _zero_grad(model)
        curvature = curvature_class(model)
        curvature.forward_backward(x, y)
        curvature.kronecker_factors(kind, kfac_approx=approx)
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "bench" / "RESULTS-gpt.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = load_model_file(ROOT / "examples" / "models" / "gpt_char.py")
    model, loss_fn = spec.model, spec.loss_fn
    T = spec.example_input.shape[1]
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(97, (args.batch, T), generator=generator)
    y = torch.randint(97, (args.batch, T), generator=generator)
    t0 = time.perf_counter()
    module = hbpc.compile_model(model, spec.example_input, loss_fn, verify=False)
    compile_seconds = time.perf_counter() - t0

    def gradient():
        _zero_grad(model)
        loss_fn(model(x), y).backward()

    rows = []
    for quantity in ("full-ggn", "full-hessian"):
        for impl in (Hbpc(module), Curvlinops(), TorchFunc()):
            phases = impl.phases(quantity, model, x, y, loss_fn)
            phases["setup"]()
            grad, times = _interleave(gradient, phases, args.reps)
            rows.append((quantity, impl.name, grad, times))
            print(quantity, impl.name, f"gradient {grad * 1e3:.1f} ms", {k: f"{v / grad:.2f}x" for k, v in times.items()},
                  flush=True)
    kfac_rows = []
    factored = module.Curvature(model).factored_parameters  # the Linear layers shared over the tokens (lm_head is tied)
    params = [p for name, p in model.named_parameters() if name in factored]
    for approx in ("expand", "reduce"):
        for ours, theirs in (("kfac", "mc"),):
            runs = {f"hbpc {ours}": _kfac_hbpc(module.Curvature, model, x, y, approx, ours),
                    f"curvlinops {theirs}": _kfac_peer(model, loss_fn, x, y, approx, theirs, params)}
            for run in runs.values():
                run()  # warm up
            grad, times = _interleave(gradient, runs, args.reps)
            kfac_rows.append((approx, ours, theirs, grad, times))
            print(approx, f"gradient {grad * 1e3:.1f} ms", {k: f"{v / grad:.2f}x" for k, v in times.items()}, flush=True)

    lines = [
        "# bench.gpt: the causal GPT (gpt_char.py) at N = %d, T = %d, %d threads" % (args.batch, T, args.threads),
        "",
        f"`python -m bench.gpt` on {platform.machine()}, torch {torch.__version__}, load average "
        f"{os.getloadavg()[0]:.1f} at the end (a shared 2-core machine: single numbers move by 10-20% between runs; "
        f"compare rows of this run only). hbpc compiled the model in {compile_seconds:.0f} s (warm derivation cache).",
        "Medians of %d repetitions, each interleaved with one autograd gradient (loss.backward())." % args.reps,
        "",
        "## Full products, × one gradient",
        "",
        "| quantity | implementation | gradient (ms) | setup × gradient | per vector × gradient |",
        "|---|---|---|---|---|",
    ]
    for quantity, name, grad, times in rows:
        lines.append(f"| {quantity} | {name} | {grad * 1e3:.1f} | {times['setup'] / grad:.2f} | "
                     f"{times['vector'] / grad:.2f} |")
    lines += ["", "hbpc's setup is `forward_backward` (loss, gradient and the caches); the peers' setup builds their "
              "operator or functions, and every product of theirs re-runs the forward pass.", "",
              "## Kronecker factors (every shared Linear layer), × one gradient", "",
              "| kfac_approx | hbpc kind | curvlinops fisher_type | gradient (ms) | hbpc (incl. forward_backward) | "
              "curvlinops | hbpc speed-up |", "|---|---|---|---|---|---|---|"]
    for approx, ours, theirs, grad, times in kfac_rows:
        a, b = times[f"hbpc {ours}"], times[f"curvlinops {theirs}"]
        lines.append(f"| {approx} | {ours} | {theirs} | {grad * 1e3:.1f} | {a / grad:.2f} | {b / grad:.2f} | "
                     f"{b / a:.2f}× |")
    lines += ["", "`kfac`/`mc`: one sampled label per token, the same estimator in both. hbpc's `kflr` (the exact "
              "per-token root of the loss Hessian, T·C = 6,208 columns per sample) is not timed: curvlinops' `type-2` "
              "backpropagates C columns shared by all tokens, which is not the exact root when tokens interact (as in "
              "attention).", ""]
    Path(args.output).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
