"""Extreme eigenpairs of a symmetric ``CurvatureOperator``: SciPy's ARPACK and a torch Lanczos.

Both return ``(values, vectors)``: ``values`` of shape ``(k,)`` and ``vectors`` of shape ``(n, k)``
(orthonormal columns, ``A vectors[:, i] ≈ values[i] vectors[:, i]``), ordered by ``which``:

| ``which`` | selects | order |
|---|---|---|
| ``"LA"`` | the ``k`` largest | descending |
| ``"SA"`` | the ``k`` smallest | ascending |
| ``"LM"`` | the ``k`` largest in magnitude | descending ``|λ|`` |
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

from hbpc.linalg.operators import CurvatureOperator, check_choice, to_scipy
from hbpc.linalg.sampling import Seed, as_generator, gaussian

WHICH = ("LA", "SA", "LM")


def select(values: Tensor, k: int, which: str) -> Tensor:
    """Indices of the ``k`` wanted entries of ``values``, most extreme first."""
    key = {"LA": values, "SA": -values, "LM": values.abs()}[which]
    return torch.argsort(key, descending=True, stable=True)[:k]


def eigsh(
    operator: CurvatureOperator,
    k: int = 10,
    which: str = "LA",
    tol: float = 0.0,
    maxiter: int | None = None,
    generator: Seed = None,
) -> tuple[Tensor, Tensor]:
    """``k`` eigenpairs by ``scipy.sparse.linalg.eigsh`` (implicitly restarted Lanczos, ``k < n``).

    ``tol`` and ``maxiter`` as in SciPy (``tol=0``: machine precision); the start vector ``v0`` is
    drawn from ``generator``, so a seed makes the result reproducible. Returns float64 CPU tensors.
    """
    from scipy.sparse.linalg import eigsh as arpack

    check_choice("which", which, WHICH)
    n = operator.shape[0]
    v0 = gaussian(n, 1, generator, torch.float64, torch.device("cpu"))[:, 0].numpy()
    values, vectors = arpack(to_scipy(operator), k, which=which, tol=tol, maxiter=maxiter, v0=v0)
    values, vectors = torch.from_numpy(values), torch.from_numpy(np.ascontiguousarray(vectors))
    order = select(values, k, which)
    return values[order], vectors[:, order]


def lanczos(
    operator: CurvatureOperator,
    k: int = 10,
    which: str = "LA",
    maxiter: int | None = None,
    tol: float | None = None,
    generator: Seed = None,
) -> tuple[Tensor, Tensor]:
    """``k`` eigenpairs by Lanczos with full reorthogonalisation, in the operator's dtype and device.

    After ``m`` steps, ``A Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ`` with orthonormal ``Q_m`` (``(n, m)``,
    every new vector orthogonalised twice against all previous ones) and tridiagonal ``T_m``
    (diagonal ``α``, off-diagonal ``β``). ``T_m = S Θ Sᵀ`` gives Ritz pairs ``(θ_i, Q_m s_i)`` with
    residuals ``‖A Q_m s_i − θ_i Q_m s_i‖ = β_m |S_{m,i}|``. Stops once the ``k`` wanted residuals are
    ``≤ tol · max|θ|`` (``tol`` defaults to ``√eps`` of the dtype), or after ``maxiter``
    (default ``min(n, 20 k + 50)``; a warning if then not converged). When the Krylov space is
    exhausted (``β ≤ √eps`` times the largest ``|α|``, ``β`` so far) it continues from a fresh random
    vector orthogonal to ``Q`` (``β = 0`` in ``T``), so eigenvalues repeated in ``A`` are found as
    well. Start vectors are drawn from ``generator``.
    """
    check_choice("which", which, WHICH)
    n = operator.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and n={n}")
    m_max = min(n, 20 * k + 50) if maxiter is None else min(n, max(k, maxiter))
    eps = torch.finfo(operator.dtype).eps
    tol = math.sqrt(eps) if tol is None else tol
    generator = as_generator(generator, operator.device)
    Q = torch.zeros(m_max, n, dtype=operator.dtype, device=operator.device)
    alphas, betas, scale = [], [], 0.0
    q = unit_orthogonal(Q[:0], generator, operator)
    for j in range(m_max):
        Q[j] = q
        w = operator.matvec(q)
        alphas.append(torch.dot(q, w).item())
        w = orthogonalise(w, Q[: j + 1])
        beta = w.norm().item()
        scale = max(scale, abs(alphas[-1]), beta)
        if j + 1 >= k:
            values, S = ritz(alphas, betas)
            wanted = select(values, k, which)
            residual = beta * S[-1, wanted].abs().max().item()
            converged = residual <= tol * values.abs().max().item()
            if converged or j + 1 == m_max:
                break
        exhausted = beta <= math.sqrt(eps) * scale
        q = unit_orthogonal(Q[: j + 1], generator, operator) if exhausted else w / beta
        betas.append(0.0 if exhausted else beta)
    if not converged and m_max < n:
        warnings.warn(f"lanczos: {k} Ritz pairs not converged after {m_max} iterations (largest residual "
                      f"{residual:.3g}); raise maxiter", stacklevel=2)
    vectors = Q[: j + 1].T @ S[:, wanted].to(dtype=operator.dtype, device=operator.device)
    return values[wanted].to(dtype=operator.dtype, device=operator.device), vectors


def ritz(alphas: list[float], betas: list[float]) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition ``T = S diag(θ) Sᵀ`` of the tridiagonal ``T`` (float64 on the CPU)."""
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(T)


def orthogonalise(w: Tensor, Q: Tensor) -> Tensor:
    """``w`` minus its projection onto the rows of ``Q`` (classical Gram-Schmidt, twice)."""
    for _ in range(2):
        w = w - Q.T @ (Q @ w)
    return w


def unit_orthogonal(Q: Tensor, generator: Seed, operator: CurvatureOperator) -> Tensor:
    """A random unit vector orthogonal to the (orthonormal) rows of ``Q``."""
    w = orthogonalise(gaussian(operator.shape[0], 1, generator, operator.dtype, operator.device)[:, 0], Q)
    return w / w.norm()
