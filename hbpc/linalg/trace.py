"""Randomised trace and diagonal estimates of a ``CurvatureOperator`` from ``m`` products.

Probes are Rademacher vectors (entries ``±1``), drawn from ``generator`` (a seed makes the
estimate reproducible); each estimator multiplies all its probes in one or two ``matmat`` calls.

* Hutchinson: ``tr(A) ≈ (1/m) Σ_i v_iᵀ A v_i``, variance ``2 (‖A‖_F² − Σ_j A_jj²) / m``.
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021): ``tr(A) = tr(Qᵀ A Q) + tr(P A P)`` with ``Q``
  an orthonormal basis of ``A S`` and ``P = I − Q Qᵀ``; the first term is exact, the second is
  estimated by Hutchinson on ``P A P``. Error ``O(1/m)`` instead of ``O(1/√m)`` for
  positive semi-definite ``A``, exact when ``rank(A)`` is at most the size of ``S``.
* Diagonal: ``diag(A) ≈ (1/m) Σ_i v_i ⊙ A v_i``, entry ``j`` with variance ``Σ_{l≠j} A_jl² / m``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hbpc.linalg.operators import CurvatureOperator
from hbpc.linalg.sampling import Seed, as_generator, rademacher


def probes(operator: CurvatureOperator, k: int, generator: Seed) -> Tensor:
    """``(n, k)`` Rademacher probes in the operator's dtype and device."""
    return rademacher(operator.shape[0], k, generator, operator.dtype, operator.device)


def check_matvecs(num_matvecs: int, least: int) -> None:
    """Raise ``ValueError`` unless ``num_matvecs >= least``."""
    if num_matvecs < least:
        raise ValueError(f"num_matvecs={num_matvecs} must be at least {least}")


def hutchinson_trace(operator: CurvatureOperator, num_matvecs: int, generator: Seed = None) -> Tensor:
    """``tr(A) ≈ (1/m) Σ_i v_iᵀ A v_i`` from ``m = num_matvecs`` probes; a 0-d tensor."""
    check_matvecs(num_matvecs, 1)
    V = probes(operator, num_matvecs, generator)
    return (V * operator.matmat(V)).sum() / num_matvecs


def hutchpp_trace(operator: CurvatureOperator, num_matvecs: int, generator: Seed = None) -> Tensor:
    """Hutch++ from ``m = num_matvecs`` products; a 0-d tensor.

    ``k = ⌊m/3⌋`` products sketch ``Q = qr(A S)`` (``S`` is ``(n, k)``), ``k`` more give
    ``tr(Qᵀ A Q)``, the other ``m − 2k`` estimate ``tr(P A P)`` with probes ``G``:
    ``tr(A) ≈ tr(Qᵀ A Q) + (1/(m − 2k)) tr((P G)ᵀ A (P G))``.
    """
    check_matvecs(num_matvecs, 3)
    generator = as_generator(generator, operator.device)
    k = num_matvecs // 3
    Q = torch.linalg.qr(operator.matmat(probes(operator, k, generator))).Q
    G = probes(operator, num_matvecs - 2 * k, generator)
    PG = G - Q @ (Q.T @ G)
    X = torch.cat([Q, PG], dim=1)
    AX = operator.matmat(X)
    products = (X * AX).sum(0)
    return products[:k].sum() + products[k:].sum() / (num_matvecs - 2 * k)


def hutchinson_diagonal(operator: CurvatureOperator, num_matvecs: int, generator: Seed = None) -> Tensor:
    """``diag(A) ≈ (1/m) Σ_i v_i ⊙ A v_i`` from ``m = num_matvecs`` probes; flat ``(n,)``.

    ``operator.unflatten`` turns it into a list shaped like the parameters.
    """
    check_matvecs(num_matvecs, 1)
    V = probes(operator, num_matvecs, generator)
    return (V * operator.matmat(V)).mean(1)


def diagonal(operator: CurvatureOperator, chunk: int = 256) -> Tensor:
    """The exact ``diag(A)``, flat ``(n,)``, from products with identity columns, ``chunk`` at a time
    (``⌈n / chunk⌉`` ``matmat`` calls: small operators, or a dataset operator with few parameters)."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be at least 1")
    n = operator.shape[0]
    out = torch.empty(n, dtype=operator.dtype, device=operator.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        E = torch.zeros(n, stop - start, dtype=operator.dtype, device=operator.device)
        E[torch.arange(start, stop), torch.arange(stop - start)] = 1
        out[start:stop] = operator.matmat(E)[start:stop].diagonal()
    return out
