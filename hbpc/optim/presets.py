"""Hyper-parameter sets of ``NewtonCG``: its defaults, the paper's update (``PAPER``) and Kronecker blocks with
kept eigendecompositions (``KRONECKER``). Why each default: ``NewtonCG``'s docstring."""

DEFAULT_LR, DEFAULT_ALPHA, DEFAULT_CG_MAXITER = 1.0, 0.1, 10
KRONECKER_LR = 2.0  # lr=None (the default) in the Kronecker mode: the line search and loss check shorten the step
DEFAULT_WARM_START, DEFAULT_PRECONDITIONER = False, None
DEFAULT_MIN_ALPHA = 0.1
AUTO = "auto"  # the default source: KRONECKER_MODE where it can run, else PRODUCTS_MODE

KRONECKER_MODE = dict(source="blocks", solver="direct", curvature="pch-abs", average_parameter_jacobian=False,
                      relative_damping=True, curvature_every=5)
"""How ``source="auto"`` solves when a step has a closure and ``curvature.blocks`` fits its ``memory_limit``."""

PRODUCTS_MODE = dict(source="block_products", solver="cg", curvature="ggn", average_parameter_jacobian=True,
                     relative_damping=False, curvature_every=1)
"""How ``source="auto"`` solves otherwise; also the defaults of these options for an explicit ``source``."""

PAPER = dict(adaptive_damping=False, line_search=False, max_backtracks=None, warm_start=False, preconditioner=None,
             min_alpha=0.0)
"""The paper's plain update ``θ ← θ + lr · d`` with fixed ``α`` and no warm start or preconditioner."""

KRONECKER = dict(KRONECKER_MODE, lr=KRONECKER_LR, alpha=0.1, min_alpha=0.0)
"""Kronecker blocks solved through eigendecompositions kept for 5 steps, damped relative to each block's scale
(``NewtonCG(params, curv, **KRONECKER)``, ``step(closure)``): the defaults' Kronecker mode with ``min_alpha=0``
instead of 0.1, for every step (``source="blocks"``: no fallback to block products, also in the plain loop, where it
diverged on small user models). ``lr=2`` overshoots the blocks' step on purpose: the full-GGN line search and the
loss check shorten it (``t``), so the step length comes from the full network's curvature rather than the blocks'.
Figures on the sigmoid FCNN: ``bench/RESULTS-time-to-target.md``."""
