"""CG preconditioners from hbpc's own cheap curvature: the diagonal, or the Kronecker factors' exact inverse, of
the HBP block of the same parameter (``NewtonCG(preconditioner=...)``)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def block_preconditioner(block, alpha: float, kind: str) -> Callable[[Tensor], Tensor] | None:
    """``r -> [(1 - α) B̃ + α I]⁻¹ r`` for an HBP block ``B̃``: its diagonal (``"diagonal"``) or, with
    Kronecker factors ``A ⊗ B``, the exact inverse through their eigendecompositions (``"kronecker"``);
    ``None`` for a block without factors that is not dense."""
    factors = getattr(block, "kronecker_factors", None)
    if factors is not None and kind == "kronecker":
        (la, Qa), (lb, Qb) = (torch.linalg.eigh(F) for F in factors)
        scale = (1.0 - alpha) * la.clamp(min=0)[:, None] * lb.clamp(min=0)[None, :] + alpha

        def kronecker(r: Tensor) -> Tensor:
            X = r.reshape(Qa.shape[0], Qb.shape[0])
            return (Qa @ ((Qa.T @ X @ Qb) / scale) @ Qb.T).reshape(r.shape)

        return kronecker
    if factors is not None:
        diagonal = torch.outer(factors[0].diagonal(), factors[1].diagonal())
    elif hasattr(block, "matrix"):
        diagonal = block.matrix.diagonal()
    else:
        return None
    diagonal = ((1.0 - alpha) * diagonal.clamp(min=0) + alpha).reshape(block.param_shape)
    return lambda r: r / diagonal
