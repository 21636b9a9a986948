"""``NewtonCG``'s safeguards that are pure functions (Martens 2010): Levenberg–Marquardt damping from the reduction
ratio, finiteness and descent checks; the line search, acceptance, step cap and divergence warning that act on the
optimizer are its methods (``NewtonCG.step``, ``check_loss``, ``capped``, ``healthy``). Constants: the damping
rule's thresholds and factors, the backtracking factor, the divergence and step-cap thresholds."""

from __future__ import annotations

import math

from torch import Tensor

from hbpc.optim.cg import inner

BOOST, DECAY = 3.0 / 2.0, 2.0 / 3.0
RHO_LOW, RHO_HIGH = 0.25, 0.75
LAMBDA_MIN, LAMBDA_MAX = 1e-8, 1e6
BACKTRACK = 0.25  # t ← BACKTRACK · t after a rise of the loss
DIVERGENCE = 100.0  # warn when the loss exceeds this times the first step's loss
MAX_STEP = 10.0  # no parameter moves by more than this times max(‖θ‖, 1) in one step


def is_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite (a finite sum of squares has finite terms; one reduction)."""
    return math.isfinite(inner(t, t).item())


def is_descent(g: Tensor, d: Tensor) -> bool:
    """Whether ``d`` is finite and ``gᵀd < 0`` (true for ``g = 0``: nothing to descend)."""
    return is_finite(d) and (inner(g, d).item() < 0.0 or not bool(g.any()))


def update_damping(alpha: float, rho: float, min_alpha: float = 0.0) -> float:
    """Levenberg–Marquardt rule (Martens 2010) on ``λ = α / (1 - α)``; returns the new ``α = λ / (1 + λ)``.

    ``ρ < 1/4``: ``λ ← 3/2 λ``; ``ρ > 3/4``: ``λ ← 2/3 λ``; otherwise unchanged; then ``λ`` is
    clamped to ``[LAMBDA_MIN, LAMBDA_MAX]`` (so an undamped ``α = 0`` can grow) and ``α`` kept
    at or above ``min_alpha``.
    """
    lam = alpha / (1.0 - alpha)
    if rho < RHO_LOW:
        lam *= BOOST
    elif rho > RHO_HIGH:
        lam *= DECAY
    lam = min(max(lam, LAMBDA_MIN), LAMBDA_MAX)
    return max(lam / (1.0 + lam), min_alpha)


def reduction_ratio(actual: float, predicted: float) -> float:
    """``ρ = actual / predicted``; ``-inf`` when the model predicts no decrease (``predicted >= 0``)."""
    return actual / predicted if predicted < 0.0 else -math.inf
