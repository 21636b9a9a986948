"""Tutorial 2: Newton-CG with HBP curvature blocks for a deep sigmoid network, on Fashion-MNIST.

The HBP paper's second tutorial and its FCNN experiment (Dangel, Harmeling & Hennig, AISTATS 2020; there on
CIFAR-10), rebuilt on hbpc with ``examples/models/fcnn_fashion_mnist.py``: Linear layers
784-1024-512-256-128-64-32-16-10 with a sigmoid after all but the last, cross-entropy loss.

The compiled ``Curvature`` backpropagates one per-sample-sized curvature matrix ``S`` from the loss to the
input (``average_input_jacobian``: ``S_x = E[J]ᵀ S_y E[J]`` plus the sigmoid residual) and hands every
Linear layer its Kronecker block ``B_W = S_y ⊗ x̄ x̄ᵀ`` (``average_parameter_jacobian``). ``pch-abs`` takes
the absolute value of the residuals, which keeps every block positive semi-definite. Newton-CG then uses by default
``NewtonCG``'s defaults (``NewtonCG(params, curvature)``, ``step(closure)``: its Kronecker mode, per-sample parameter
Jacobians, damping relative to each block's scale, factor inverses kept for 5 steps; see ``bench/time_to_target.py``),
the preset ``hbpc.optim.KRONECKER`` with ``--newton kronecker``, or the paper's update and hyper-parameters with
``--newton paper`` (``PAPER``: lr 0.1, α 0.02, CG tol 0.1, maxiter 50); the baselines are SGD with the paper's lr
0.1 and momentum 0.9, and Adam at lr 3e-3 (the best of ``bench/time_to_target.py``'s sweep on this network), on
the same batches.

The protocol (``make demo``): 200 steps of batch 500 (1.7 epochs), evaluation on the whole test set every
10 steps (not counted in the training seconds), time to test accuracy 0.6. This network sits on a plateau at chance
(loss ln 10) for its first hundred-odd steps; the demo runs long enough to show which optimizer leaves it, and when,
in steps and in seconds. Batch 500, not 128: a Newton-CG step's fixed cost (factor inverses, the first layer's
``1024 × 1024`` products) amortises over the batch, while a first-order step's cost grows with it.

    hbpc compile examples/models/fcnn_fashion_mnist.py -o out/demo/curv_fcnn.py
    python examples/02_sequential.py --compiled out/demo/curv_fcnn.py --out out/demo
"""

from pathlib import Path

import _common
import hbpc
from hbpc.compiler import import_generated
from hbpc.export import load_model_file
from hbpc.optim import KRONECKER, PAPER, NewtonCG

MODEL_FILE = Path(__file__).parent / "models" / "fcnn_fashion_mnist.py"
NEWTON = dict(PAPER, lr=0.1, alpha=0.02, cg_tol=0.1, cg_atol=0.0, cg_maxiter=50, curvature="pch-abs",
              average_input_jacobian=True, average_parameter_jacobian=True)
PRESETS = {"defaults": {}, "kronecker": KRONECKER, "paper": NEWTON}
SGD_LR, SGD_MOMENTUM, ADAM_LR = 0.1, 0.9, 3e-3


def arguments(argv):
    """The shared options plus ``--compiled`` and ``--solver``."""
    p = _common.parser(__doc__.splitlines()[0], steps=200, out="out/02_sequential")
    p.set_defaults(eval_every=10, target=0.6)
    p.add_argument("--compiled", type=Path,
                   help="an already generated module of fcnn_fashion_mnist.py (default: compile it into --out)")
    p.add_argument("--newton", choices=tuple(PRESETS), default="defaults",
                   help="defaults: NewtonCG(params, curvature) with step(closure); kronecker: hbpc.optim.KRONECKER "
                        "(the defaults' Kronecker mode with min_alpha 0); paper: the paper's CG update (default: %(default)s)")
    p.add_argument("--solver", choices=("cg", "direct"), default="cg",
                   help="with --newton paper: cg, the paper's CG on each block; direct: Kronecker eigendecompositions")
    return p.parse_args(argv)


def curvature_module(spec, args):
    """The generated module: imported from ``--compiled``, or compiled from the model file into ``--out``."""
    if args.compiled is not None:
        return import_generated(args.compiled)
    return hbpc.compile_model(spec.model, spec.example_input, spec.loss_fn, path=args.out / "curv_fcnn.py")


def closure_update(curvature, optimizer):
    """``update(x, y)`` through ``optimizer.step(closure)``, which enables NewtonCG's loss checks."""
    def update(x, y) -> float:
        optimizer.zero_grad()
        return float(optimizer.step(lambda: curvature.forward_backward(x, y)))
    return update


def main(argv=None) -> None:
    """Compile (or import), train Newton-CG, SGD and Adam, write the curves and print the final accuracies."""
    args = arguments(argv)
    train, test, dataset = _common.load_data(args.data_dir)
    spec = load_model_file(MODEL_FILE)
    args.out.mkdir(parents=True, exist_ok=True)
    curv_fcnn = curvature_module(spec, args)
    runs = _common.baselines(spec.model, spec.loss_fn, SGD_LR, SGD_MOMENTUM, ADAM_LR)  # copies of the initial weights
    curvature = curv_fcnn.Curvature(spec.model)
    if args.newton != "paper":
        optimizer = NewtonCG(spec.model.parameters(), curvature, **PRESETS[args.newton])
        label = "defaults" if args.newton == "defaults" else "KRONECKER preset"
        newton = _common.Run(f"Newton-CG (HBP, {label})", spec.model, closure_update(curvature, optimizer))
    else:
        optimizer = NewtonCG(spec.model.parameters(), curvature, solver=args.solver, **NEWTON)
        newton = _common.Run(f"Newton-CG (HBP, PCH-abs, {args.solver})", spec.model,
                             _common.newton_update(curvature, optimizer))
    title = f"Tutorial 2: sigmoid FCNN on {dataset}, batch {args.batch_size}"
    _common.compare([newton, *runs], args, spec.loss_fn, train, test, title)


if __name__ == "__main__":
    main()
