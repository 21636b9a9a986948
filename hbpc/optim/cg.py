"""Conjugate gradients for symmetric systems ``A x = b`` that may turn out indefinite.

Vectors are tensors of any shape; inner products run over all entries,
``<u, v> = sum(u * v)``. ``A`` is a square matrix of side ``b.numel()`` or a
callable ``v -> A v`` that keeps ``v``'s shape.

Iteration (Hestenes & Stiefel), starting from ``r_0 = b - A x_0``, ``p_0 = r_0``::

    a_k     = <r_k, r_k> / <p_k, A p_k>
    x_{k+1} = x_k + a_k p_k
    r_{k+1} = r_k - a_k A p_k
    b_k     = <r_{k+1}, r_{k+1}> / <r_k, r_k>
    p_{k+1} = r_{k+1} + b_k p_k

Stopping follows SciPy: converged when ``||r_k|| <= max(tol * ||b||, atol)``;
at most ``maxiter`` (default ``10 * b.numel()``) iterations. On a singular or
badly conditioned ``A`` the residual of CG need not fall monotonically (with an
inconsistent ``b`` it grows without bound), so ``cg`` returns the iterate with the
smallest residual seen, and stops (``"diverged"``) once the residual exceeds
``DIVERGENCE`` times that smallest one.

Preconditioning: with ``M`` (a callable ``r -> M⁻¹ r``, symmetric positive definite),
``z_k = M⁻¹ r_k`` replaces ``r_k`` in ``p`` and in the numerators,
``a_k = <r_k, z_k> / <p_k, A p_k>``, ``b_k = <r_{k+1}, z_{k+1}> / <r_k, z_k>``
(preconditioned CG); the stopping rule still measures ``||r_k||``.

Warm start: an ``x0`` whose quadratic model ``q(x0) = -1/2 <r_0 + b, x0>`` is not
below ``q(0) = 0`` is dropped and CG starts from zero (it would start worse than
from nothing).

Negative curvature: when ``<p_k, A p_k> <= 0`` the system is not positive
definite and ``a_k`` is not divided out. Numerically zero curvature counts too:
``<p_k, A p_k> <= SINGULAR · <p_k, p_k> · max_j <p_j, A p_j> / <p_j, p_j>`` (a direction
whose Rayleigh quotient is below ``SINGULAR`` times the largest seen; dividing by it
would move ``x`` by ``1/SINGULAR`` times more than the rest of the solution, as on a
singular, undamped curvature block). CG stops and returns ``x_k``. While
every previous ``<p_j, A p_j> > 0``, each step lowered the quadratic model
``q(x) = 1/2 <x, A x> - <b, x>`` by ``<r_j, r_j>^2 / (2 <p_j, A p_j>)``, so
``x_k`` is the best iterate so far. At iteration 0 this is ``x_0`` (zeros when
``x0`` is None); callers that want a step anyway (see ``NewtonCG``) fall back
to ``b``, the steepest-descent direction of ``q`` at zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor

Operator = Union[Tensor, Callable[[Tensor], Tensor]]

CONVERGED = "converged"
MAXITER = "maxiter"
NEGATIVE_CURVATURE = "negative curvature"
NON_FINITE = "non-finite curvature"
DIVERGED = "diverged"
DIVERGENCE = 1e3  # stop when ||r_k|| exceeds this times the smallest residual so far
SINGULAR = 1e-10  # a Rayleigh quotient below this times the largest seen is zero curvature


@dataclass(frozen=True)
class CGInfo:
    """Outcome of one ``cg`` call.

    ``residual_norm`` is ``||r||`` of the returned iterate (recursive residual);
    ``reason`` is one of ``"converged"``, ``"maxiter"``, ``"negative curvature"``,
    ``"non-finite curvature"`` (``A p`` contained inf or NaN), ``"diverged"`` (the residual
    grew ``DIVERGENCE``-fold; the smallest-residual iterate is returned). ``warm_start`` says
    whether ``x0`` was used (see the module docstring).
    """

    converged: bool
    iterations: int
    residual_norm: float
    negative_curvature: bool
    reason: str
    warm_start: bool = False


def as_operator(A: Operator, shape: torch.Size) -> Callable[[Tensor], Tensor]:
    """Return ``v -> A v`` for ``v`` of ``shape``; a matrix ``A`` is ``(numel, numel)``."""
    if not isinstance(A, Tensor):
        return A
    n = math.prod(shape)
    if A.shape != (n, n):
        raise ValueError(f"matrix A has shape {tuple(A.shape)}, expected ({n}, {n}) for b of shape {tuple(shape)}")
    return lambda v: (A @ v.reshape(n)).reshape(shape)


def inner(u: Tensor, v: Tensor) -> Tensor:
    """``<u, v> = sum(u * v)`` over all entries, a 0-d tensor."""
    return torch.dot(u.reshape(-1), v.reshape(-1))


def cg(
    A: Operator,
    b: Tensor,
    x0: Tensor | None = None,
    tol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int | None = None,
    M: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, CGInfo]:
    """Solve ``A x = b`` by (preconditioned) conjugate gradients; return ``(x, CGInfo)``.

    ``x`` has ``b``'s shape, dtype and device. See the module docstring for the
    iteration, stopping rule, preconditioner ``M``, warm start ``x0`` and the handling of
    negative curvature.
    """
    matvec = as_operator(A, b.shape)
    precondition = (lambda r: r) if M is None else M
    maxiter = 10 * b.numel() if maxiter is None else maxiter
    x, r, warm = start(matvec, b, x0)
    threshold = max(tol * inner(b, b).sqrt().item(), atol)
    rr = inner(r, r).item()
    z = precondition(r)
    rz = inner(r, z).item()
    p = z.clone()
    best_x, best_rr = x.clone(), rr
    largest = 0.0  # largest Rayleigh quotient <p, A p> / <p, p> so far

    def info(reason: str, iterations: int, residual_squared: float) -> CGInfo:
        return CGInfo(reason == CONVERGED, iterations, math.sqrt(residual_squared), reason == NEGATIVE_CURVATURE,
                      reason, warm)

    for k in range(maxiter):
        if math.sqrt(rr) <= threshold:
            return x, info(CONVERGED, k, rr)
        Ap = matvec(p)
        pAp = inner(p, Ap).item()
        if not math.isfinite(pAp):
            return best_x, info(NON_FINITE, k, best_rr)
        rayleigh = pAp / inner(p, p).item()
        if rayleigh <= SINGULAR * largest or pAp <= 0.0:
            return x, info(NEGATIVE_CURVATURE, k, rr)
        largest = max(largest, rayleigh)
        a = rz / pAp
        x.add_(p, alpha=a)
        r.sub_(Ap, alpha=a)
        rr = inner(r, r).item()
        if not math.isfinite(rr) or rr > DIVERGENCE**2 * best_rr:
            return best_x, info(DIVERGED, k + 1, best_rr)
        if rr < best_rr:
            best_x.copy_(x)
            best_rr = rr
        z = precondition(r)
        rz_next = inner(r, z).item()
        p.mul_(rz_next / rz).add_(z)
        rz = rz_next
    if math.sqrt(rr) <= threshold:
        return x, info(CONVERGED, maxiter, rr)
    return best_x, info(MAXITER, maxiter, best_rr)


def start(matvec: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None) -> tuple[Tensor, Tensor, bool]:
    """``(x_0, r_0 = b - A x_0, warm)``: ``x0`` if its model ``q(x0) = -1/2 <r_0 + b, x0>`` is below 0, else zeros."""
    if x0 is not None:
        x = x0.detach().clone().to(b)
        r = b - matvec(x)
        if inner(r + b, x).item() > 0.0 or not bool(x.any()):
            return x, r, True
    return torch.zeros_like(b), b.clone(), False
