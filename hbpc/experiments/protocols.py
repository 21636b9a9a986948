"""The HBP paper's four experiments as data: architectures, optimizers, hyper-parameters and run sizes.

Everything here follows ``paper-experiments.md`` (the paper's public code, f-dangel/hbp 2020). An
``Experiment`` lists its ``Method``s (one optimizer with fixed hyper-parameters and batch size each); a
``Profile`` fixes how long and on how much data every experiment runs (``paper``: the original sizes;
``here``: the whole suite in about 50 minutes on two CPU cores).

Deviations that the data or the library force, all stated where they occur:

* Fashion-MNIST (1×28×28) replaces CIFAR-10; the models keep the paper's layers with the input adapted
  (``examples/models/*_fashion_mnist.py``). ``--dataset cifar10`` runs the original models.
* KFAC's G-factors: the paper's third-party KFAC ran with the true labels (empirical-label gradients);
  ``hbpc.optim.KFAC(kind="kfac")`` samples labels from the model's predictive distribution (the usual
  Monte-Carlo Fisher), since hbpc has no empirical-Fisher factors. It runs the paper's update
  (``step_size="fixed"``: KL-clipped heavy ball, absolute damping ``λ_G λ_Aᵀ + 1e-3``, no trust region),
  not ``KFAC``'s defaults (relative damping, step from the exact GGN model, ``max_change``), which
  leave the sigmoid c4d3's plateau where the paper's update stays at chance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hbpc.optim.presets import PAPER

SGD, ADAM, KFAC, NEWTON = "sgd", "adam", "kfac", "newton-cg"
DATASETS = ("fashion-mnist", "cifar10")

# CG-Newton settings shared by every HBP run of exp01/exp02 (paper: CGNewton on HBP blocks).
# Both use the paper's plain update (PAPER: fixed damping, no line search, loss checks or warm starts).
HBP_BLOCKS = dict(PAPER, source="blocks", lr=0.1, alpha=0.02, cg_tol=0.1, cg_atol=0.0, cg_maxiter=50,
                  average_input_jacobian=True, average_parameter_jacobian=True)
# CG-Newton on exact diagonal-block curvature products (the paper's "CVP"), exp08/exp09.
CVP = dict(PAPER, source="block_products", cg_tol=0.1, cg_atol=0.0, cg_maxiter=200)


@dataclass(frozen=True)
class Method:
    """One optimizer of an experiment.

    ``key`` names the run folder, ``label`` the legend entry; ``optimizer`` is ``sgd``, ``adam``,
    ``kfac`` or ``newton-cg`` and ``hyper`` its keyword arguments (for ``newton-cg`` those of
    ``hbpc.optim.NewtonCG``, including ``curvature`` and ``source``).
    """

    key: str
    label: str
    optimizer: str
    batch_size: int
    hyper: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Architecture:
    """A model of the paper: its model file per dataset (in ``examples/models``) and its initialization.

    ``init`` is ``xavier_normal`` (every weight Xavier-normal, biases zero), ``default`` (PyTorch's
    ``reset_parameters``) or ``deepobs`` (Xavier-normal conv weights, Xavier-uniform linear weights,
    biases zero); it is redrawn per seed, as the paper seeded before building the model.
    """

    key: str
    files: dict
    init: str


@dataclass(frozen=True)
class Experiment:
    """One of the paper's experiments: a model trained by several methods on the same data.

    ``borrowed`` lists ``(experiment, method)`` runs that this experiment's figure also shows (exp02
    shows exp01's SGD curve); running the experiment runs them too.
    """

    key: str
    title: str
    architecture: Architecture
    methods: tuple[Method, ...]
    borrowed: tuple[tuple[str, str], ...] = ()

    def method(self, key: str) -> Method:
        """The method named ``key``."""
        for method in self.methods:
            if method.key == key:
                return method
        raise KeyError(f"{self.key} has no method {key!r}; it has {', '.join(m.key for m in self.methods)}")


@dataclass(frozen=True)
class Sizes:
    """How one experiment runs in a profile.

    ``train_samples``: a random subset of the training set drawn per seed (``None``: all of it), one
    epoch is one pass over it; ``train_eval_samples``: size of the fresh random subset of those training
    samples evaluated at each log; ``test_samples``: the first samples of the test set that are
    evaluated (``None``: all); ``logs_per_epoch`` as in the paper's ``idx % (batches // logs) == 0``.
    """

    epochs: int
    logs_per_epoch: int
    train_samples: int | None = None
    train_eval_samples: int = 10_000
    test_samples: int | None = None


@dataclass(frozen=True)
class Profile:
    """Seeds and per-experiment ``Sizes``."""

    name: str
    seeds: tuple[int, ...]
    sizes: dict
    note: str = ""


FCNN = Architecture("fcnn", {"fashion-mnist": "fcnn_fashion_mnist.py", "cifar10": "fcnn_cifar10.py"},
                    "xavier_normal")
C4D3 = Architecture("c4d3", {"fashion-mnist": "c4d3_fashion_mnist.py", "cifar10": "c4d3_cifar10.py"}, "default")
DEEPOBS_3C3D = Architecture("3c3d", {"fashion-mnist": "deepobs_3c3d_fashion_mnist.py",
                                     "cifar10": "deepobs_3c3d_cifar10.py"}, "deepobs")

EXP01 = Experiment("exp01", "Chen et al. FCNN: SGD vs. CG-Newton on HBP blocks", FCNN, (
    Method("sgd", "SGD", SGD, 500, dict(lr=0.1, momentum=0.9)),
    Method("ggn", "GGN", NEWTON, 500, dict(HBP_BLOCKS, curvature="ggn")),
    Method("pch-abs", "PCH-abs", NEWTON, 500, dict(HBP_BLOCKS, curvature="pch-abs")),
    Method("pch-clip", "PCH-clip", NEWTON, 500, dict(HBP_BLOCKS, curvature="pch-clip")),
))
EXP02 = Experiment("exp02", "Chen et al. FCNN: parameter splitting, PCH-abs", FCNN, tuple(
    Method(f"pch-abs-split{k}", f"{k} block{'s' if k > 1 else ''}", NEWTON, 500,
           dict(HBP_BLOCKS, curvature="pch-abs", split=k))
    for k in (1, 2, 4, 16)
), borrowed=(("exp01", "sgd"),))
EXP08 = Experiment("exp08", "c4d3 with sigmoids: first-order, KFAC and CG-Newton on exact block products", C4D3, (
    Method("sgd", "SGD", SGD, 100, dict(lr=1e-3, momentum=0.9)),
    Method("adam", "Adam", ADAM, 100, dict(lr=1e-3, betas=(0.9, 0.999))),
    Method("kfac", "KFAC", KFAC, 500, dict(lr=0.1, momentum=0.9, factor_decay=0.95, damping=1e-3, kl_clip=1e-3,
                                           weight_decay=0.0, factor_interval=10, inverse_interval=100,
                                           kind="kfac", step_size="fixed", relative_damping=False, max_change=None)),
    Method("pch-abs", "PCH-abs", NEWTON, 1000, dict(CVP, curvature="pch-abs", lr=0.2, alpha=1e-3)),
    Method("pch-clip", "PCH-clip", NEWTON, 1000, dict(CVP, curvature="pch-clip", lr=0.1, alpha=1e-4)),
    Method("ggn-alpha1", "GGN, α1", NEWTON, 1000, dict(CVP, curvature="ggn", lr=0.1, alpha=1e-4)),
    Method("ggn-alpha2", "GGN, α2", NEWTON, 1000, dict(CVP, curvature="ggn", lr=0.1, alpha=1e-3)),
))
EXP09 = Experiment("exp09", "DeepOBS 3c3d with sigmoids: first-order and CG-Newton on exact block products",
                   DEEPOBS_3C3D, (
    Method("sgd", "SGD", SGD, 100, dict(lr=1.0, momentum=0.0)),
    Method("adam", "Adam", ADAM, 100, dict(lr=1e-3, betas=(0.9, 0.999))),
    Method("pch-abs", "PCH-abs", NEWTON, 500, dict(CVP, curvature="pch-abs", lr=0.1, alpha=1e-3)),
    Method("pch-clip", "PCH-clip", NEWTON, 500, dict(CVP, curvature="pch-clip", lr=0.1, alpha=1e-2)),
    Method("ggn", "GGN", NEWTON, 500, dict(CVP, curvature="ggn", lr=0.05, alpha=1e-3)),
))

EXPERIMENTS = {e.key: e for e in (EXP01, EXP02, EXP08, EXP09)}

PAPER = Profile("paper", tuple(range(10)), {
    "exp01": Sizes(epochs=100, logs_per_epoch=1),
    "exp02": Sizes(epochs=100, logs_per_epoch=1),
    "exp08": Sizes(epochs=20, logs_per_epoch=4),
    "exp09": Sizes(epochs=20, logs_per_epoch=4),
}, "the paper's sizes: 10 seeds, full training and test sets, 10k-sample training evaluation")
HERE = Profile("here", (0, 1), {
    # The sigmoid FCNN sits on a plateau for a few hundred steps: the full training set (120 steps an epoch)
    # gives 1200 steps, enough to see which method leaves it.
    "exp01": Sizes(epochs=10, logs_per_epoch=2, train_eval_samples=2_000, test_samples=2_000),
    "exp02": Sizes(epochs=10, logs_per_epoch=2, train_eval_samples=2_000, test_samples=2_000),
    "exp08": Sizes(epochs=2, logs_per_epoch=4, train_samples=10_000, train_eval_samples=1_000, test_samples=1_000),
    "exp09": Sizes(epochs=2, logs_per_epoch=4, train_samples=5_000, train_eval_samples=1_000, test_samples=1_000),
}, "the whole suite in about 50 minutes on two idle CPU cores: 2 seeds, 10 epochs of the FCNN, short CNN runs "
   "on training subsets")
PROFILES = {p.name: p for p in (HERE, PAPER)}


def find_method(experiment: str, method: str) -> Method:
    """The method ``method`` of experiment ``experiment``."""
    return EXPERIMENTS[experiment].method(method)
