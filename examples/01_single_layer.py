"""Tutorial 1: Newton-CG with HBP curvature blocks for one linear layer, on Fashion-MNIST.

The HBP paper's first tutorial (Dangel, Harmeling & Hennig, AISTATS 2020; there on MNIST), rebuilt on hbpc:

1. compile ``examples/models/logreg_fashion_mnist.py`` (Flatten, Linear 784 -> 10, cross-entropy) into a
   curvature module and import it;
2. bind its ``Curvature`` to the model: ``forward_backward(x, y)`` returns the loss and fills ``p.grad``,
   ``blocks("ggn")`` returns the HBP blocks ``B_W = S_z ⊗ x̄ x̄ᵀ`` and ``B_b = S_z`` with
   ``S_z = Σ_n ∇²_{z_n} L`` (one layer has no residuals: GGN, Hessian and PCH coincide);
3. train with ``hbpc.optim.NewtonCG``, which solves ``[(1 - α) B + α I] d = -g`` for every block by CG
   and steps ``θ ← θ + lr d`` (the tutorial's lr 0.1, α 0.02, CG tol 0.1, maxiter 50, batch 500),
   next to SGD (lr 0.1, momentum 0.9) and Adam (lr 1e-3) on the same batches.

With the rank-one weight factor ``x̄ x̄ᵀ`` the damped block is ``α I`` off a subspace of at most 10
dimensions, so most of the weight moves like gradient descent with step ``lr / α = 5``;
``--no-average-parameter-jacobian`` uses ``E[x xᵀ]`` instead (KFRA's weight block), of full rank.

    python examples/01_single_layer.py --epochs 2 --out out/01_single_layer
"""

import argparse
from pathlib import Path

import _common
import hbpc
from hbpc.export import load_model_file
from hbpc.optim import PAPER, NewtonCG

MODEL_FILE = Path(__file__).parent / "models" / "logreg_fashion_mnist.py"
NEWTON = dict(PAPER, lr=0.1, alpha=0.02, cg_tol=0.1, cg_atol=0.0, cg_maxiter=50)
SGD_LR, SGD_MOMENTUM = 0.1, 0.9


def arguments(argv):
    """The shared options plus ``--average-parameter-jacobian``."""
    p = _common.parser(__doc__.splitlines()[0], steps=240, out="out/01_single_layer")
    p.add_argument("--average-parameter-jacobian", action=argparse.BooleanOptionalAction, default=True,
                   help="weight factor x̄ x̄ᵀ of rank one, as in the paper (default); with --no-average-parameter-"
                        "jacobian E[x xᵀ], KFRA's full-rank factor")
    return p.parse_args(argv)


def main(argv=None) -> None:
    """Compile, train Newton-CG, SGD and Adam, write the curves and print the final accuracies."""
    args = arguments(argv)
    train, test, dataset = _common.load_data(args.data_dir)
    spec = load_model_file(MODEL_FILE)
    args.out.mkdir(parents=True, exist_ok=True)
    # the same as `hbpc compile examples/models/logreg_fashion_mnist.py -o OUT/curv_logreg.py`, then importing it
    curv_logreg = hbpc.compile_model(spec.model, spec.example_input, spec.loss_fn, path=args.out / "curv_logreg.py")
    runs = _common.baselines(spec.model, spec.loss_fn, SGD_LR, SGD_MOMENTUM)  # copies of the initial weights
    curvature = curv_logreg.Curvature(spec.model)
    optimizer = NewtonCG(spec.model.parameters(), curvature, curvature="ggn",
                         average_parameter_jacobian=args.average_parameter_jacobian, **NEWTON)
    factor = "x̄ x̄ᵀ" if args.average_parameter_jacobian else "E[x xᵀ]"
    newton = _common.Run(f"Newton-CG (HBP, GGN, S ⊗ {factor})", spec.model, _common.newton_update(curvature, optimizer))
    title = f"Tutorial 1: logistic regression on {dataset}, batch {args.batch_size}"
    _common.compare([newton, *runs], args, spec.loss_fn, train, test, title)


if __name__ == "__main__":
    main()
