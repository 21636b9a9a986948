"""Inverse operators: damped inverse-vector products ``(A + λ I)⁻¹ v`` with the forward operators' interface.

Every inverse is a ``CurvatureOperator`` (``@``, ``matmat``, ``to_dense``, ``to_scipy``, lists shaped like the
parameters) built from a forward one:

| method | ``A`` | ``(A + λ I)⁻¹`` |
|---|---|---|
| ``operator.inverse(λ, preconditioner=M)`` | any | preconditioned CG, all ``k`` columns at once (``cg_inverse``) |
| ``neumann_inverse(operator, λ, terms)`` | any, PSD | ``α Σ_{j<K} (I − α(A + λI))^j``, ``α = 1/(λ_max + λ)`` |
| ``blocks.inverse(λ)`` | ``BlockDiagonalOperator`` | exact per block (Kronecker through eigendecompositions) |
| ``blocks.inverse(λ, damping_split="pi")`` | Kronecker blocks | ``(G + π√λ I)⁻¹ ⊗ (A + √λ/π I)⁻¹`` |

π-heuristic (Martens & Grosse 2015, Sec. 6.3): ``G ⊗ A + λ I`` is approximated by the Kronecker product
``(G + π√λ I) ⊗ (A + √λ/π I)`` with ``π = sqrt((tr G / d_G) / (tr A / d_A))``, which minimises the norm of
the cross terms ``π√λ I ⊗ A + √λ/π G ⊗ I``; its inverse is the Kronecker product of the factors' inverses.

``BlockDiagonalOperator.logdet(λ)`` and ``.trace(λ)`` are exact for ``diag(B_θ) + λ I`` from the blocks'
structure: ``G ⊗ A + λI`` has eigenvalues ``g_i a_j + λ``, so ``logdet = Σ_ij log(g_i a_j + λ)`` and
``tr = tr G tr A + λ d_G d_A``; with ``damping_split="pi"`` they are those of the π-damped Kronecker product,
``d_A Σ_i log(g_i + π√λ) + d_G Σ_j log(a_j + √λ/π)`` and ``(tr G + π√λ d_G)(tr A + √λ/π d_A)``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from hbpc.linalg.operators import CurvatureOperator, check_choice

DAMPING_SPLITS = ("exact", "pi")


@dataclass(frozen=True)
class CGInverseInfo:
    """The latest ``cg_inverse`` product: iterations, the largest relative residual, and whether all converged."""

    iterations: int
    relative_residual: float
    converged: bool


def as_columns(M) -> Callable[[Tensor], Tensor]:
    """``(n, k) -> (n, k)`` from a ``CurvatureOperator``, an ``(n, n)`` matrix or a callable."""
    if M is None:
        return lambda R: R
    if isinstance(M, CurvatureOperator):
        return M.matmat
    if isinstance(M, Tensor):
        return lambda R: M @ R
    return M


def damped(operator: CurvatureOperator, damping: float) -> Callable[[Tensor], Tensor]:
    """``V -> (A + λ I) V`` on ``(n, k)`` columns."""
    return lambda V: operator.matmat(V) + damping * V


def pcg(apply: Callable[[Tensor], Tensor], B: Tensor, precondition: Callable[[Tensor], Tensor], tol: float,
        atol: float, maxiter: int) -> tuple[Tensor, CGInverseInfo]:
    """Solve ``K X = B`` for ``k`` columns at once by preconditioned CG (one product per iteration for all).

    Per column: ``z = M r``, ``a = rᵀz / pᵀKp``, ``x += a p``, ``r −= a K p``, ``p = z' + (r'ᵀz' / rᵀz) p``;
    a column stops once ``‖r‖ ≤ max(tol ‖b‖, atol)`` (its steps become 0). ``pᵀKp ≤ 0`` (``K`` not positive
    definite) raises ``ValueError``.
    """
    X = torch.zeros_like(B)
    R = B.clone()
    threshold = torch.clamp(tol * B.norm(dim=0), min=atol)
    Z = precondition(R)
    P = Z.clone()
    rz = (R * Z).sum(0)
    iterations = 0
    for iterations in range(maxiter + 1):
        active = R.norm(dim=0) > threshold
        if not bool(active.any()) or iterations == maxiter:
            break
        KP = apply(P)
        pKp = (P * KP).sum(0)
        if bool((pKp[active] <= 0).any()):
            raise ValueError("CG met pᵀ(A + λI)p <= 0: the damped operator is not positive definite; raise damping")
        a = torch.where(active, rz / torch.where(active, pKp, torch.ones_like(pKp)), torch.zeros_like(rz))
        X += a * P
        R -= a * KP
        Z = precondition(R)
        rz_next = (R * Z).sum(0)
        beta = torch.where(active, rz_next / torch.where(active, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        P = Z + beta * P
        rz = rz_next
    relative = (R.norm(dim=0) / B.norm(dim=0).clamp(min=torch.finfo(B.dtype).tiny)).max().item()
    return X, CGInverseInfo(iterations, relative, bool((R.norm(dim=0) <= threshold).all()))


def cg_inverse(operator: CurvatureOperator, damping: float = 0.0, preconditioner=None, tol: float = 1e-8,
               atol: float = 0.0, maxiter: int | None = None) -> CurvatureOperator:
    """``(A + λ I)⁻¹`` by preconditioned CG on every product (``preconditioner`` ≈ ``(A + λ I)⁻¹``: an operator,
    a matrix or a callable on ``(n, k)``; e.g. ``kronecker_operator(...).inverse(λ, damping_split="pi")``).

    ``maxiter`` defaults to ``n``; ``result.info`` holds the latest product's ``CGInverseInfo``.
    """
    check_damping(damping)
    maxiter = operator.shape[0] if maxiter is None else maxiter
    apply, precondition = damped(operator, damping), as_columns(preconditioner)
    inverse = CurvatureOperator(lambda vs: {}, operator.shapes, operator.dtype, operator.device)

    def product(vs: dict[str, Tensor]) -> dict[str, Tensor]:
        X, inverse.info = pcg(apply, operator.join(vs), precondition, tol, atol, maxiter)
        return operator.split(X)

    inverse.product = product
    inverse.info = None
    return inverse


def neumann_inverse(operator: CurvatureOperator, damping: float = 0.0, terms: int = 100, scale: float | None = None,
                    generator=0) -> CurvatureOperator:
    """``(A + λ I)⁻¹ ≈ α Σ_{j=0}^{K-1} (I − α (A + λ I))^j`` with ``K = terms`` (Horner: ``K`` products).

    ``scale`` ``α`` must satisfy ``0 < α < 2 / (λ_max + λ)`` for ``A + λI`` positive definite; by default
    ``α = 1 / (λ_max + λ)`` with ``λ_max`` from Lanczos (seeded by ``generator``). The error shrinks like
    ``(1 − α (λ_min + λ))^K``.
    """
    check_damping(damping)
    if terms < 1:
        raise ValueError(f"terms={terms} must be at least 1")
    if scale is None:
        from hbpc.linalg.eigen import lanczos

        top = lanczos(operator, k=1, generator=generator)[0].item()
        scale = 1.0 / (top + damping) if top + damping > 0 else None
        if scale is None:
            raise ValueError("A + λI has no positive eigenvalue; the Neumann series needs a positive definite operator")
    apply = damped(operator, damping)

    def product(vs: dict[str, Tensor]) -> dict[str, Tensor]:
        V = operator.join(vs)
        S = V.clone()
        for _ in range(terms - 1):  # S ← v + (I − α K) S
            S = V + S - scale * apply(S)
        return operator.split(scale * S)

    return CurvatureOperator(product, operator.shapes, operator.dtype, operator.device)


def check_damping(damping: float) -> None:
    if not damping >= 0:
        raise ValueError(f"damping={damping!r} must be >= 0")


class BlockDiagonalOperator(CurvatureOperator):
    """``diag(B_θ1, …)`` from structured blocks ``{name: Block}`` (``blocks``, ``kronecker_factors``, dataset
    versions): products, and exact ``inverse``, ``logdet``, ``trace`` from each block's structure."""

    def __init__(self, blocks: dict, dtype: torch.dtype, device: torch.device):
        self.blocks = blocks
        shapes = {name: torch.Size(block.param_shape) for name, block in blocks.items()}
        super().__init__(lambda vs: {name: blocks[name] @ v for name, v in vs.items()}, shapes, dtype, device)

    def inverse(self, damping: float = 0.0, damping_split: str = "exact", **ignored) -> "BlockDiagonalOperator":
        """``(B + λ I)⁻¹`` block by block: ``"exact"`` for every block, ``"pi"`` the π-damped Kronecker inverse."""
        check_damping(damping)
        check_choice("damping_split", damping_split, DAMPING_SPLITS)
        return BlockDiagonalOperator({name: inverse_block(block, damping, damping_split)
                                      for name, block in self.blocks.items()}, self.dtype, self.device)

    def logdet(self, damping: float = 0.0, damping_split: str = "exact") -> Tensor:
        """``log det(B + λ I)`` (``"pi"``: of the π-damped Kronecker blocks); a 0-d tensor."""
        check_choice("damping_split", damping_split, DAMPING_SPLITS)
        return sum(block_logdet(block, damping, damping_split) for block in self.blocks.values())

    def trace(self, damping: float = 0.0, damping_split: str = "exact") -> Tensor:
        """``tr(B + λ I)`` (``"pi"``: of the π-damped Kronecker blocks); a 0-d tensor."""
        check_choice("damping_split", damping_split, DAMPING_SPLITS)
        return sum(block_trace(block, damping, damping_split) for block in self.blocks.values())


def factors(block) -> tuple[Tensor, Tensor] | None:
    """``(G, A)`` of a Kronecker block (``B = G ⊗ A``), else ``None``."""
    pair = getattr(block, "kronecker_factors", None)
    return None if pair is None else tuple(pair)


def pi_split(G: Tensor, A: Tensor, damping: float) -> tuple[float, float]:
    """Damping ``(π√λ, √λ/π)`` of ``G`` and ``A`` with ``π = sqrt((tr G / d_G) / (tr A / d_A))`` (1 if a trace is 0)."""
    mean_g, mean_a = (torch.trace(G) / G.shape[0]).item(), (torch.trace(A) / A.shape[0]).item()
    pi = math.sqrt(mean_g / mean_a) if mean_g > 0 and mean_a > 0 else 1.0
    root = math.sqrt(damping)
    return pi * root, root / pi


def identity_like(M: Tensor) -> Tensor:
    return torch.eye(M.shape[0], dtype=M.dtype, device=M.device)


def classes_of(block):
    """The generated module's ``(DenseBlock, KroneckerBlock)`` that ``block`` comes from."""
    module = sys.modules[type(block).__module__]
    return module.DenseBlock, module.KroneckerBlock


def inverse_block(block, damping: float, damping_split: str):
    """``(B + λ I)⁻¹`` as a block: Kronecker ``(G + δ_G I)⁻¹ ⊗ (A + δ_A I)⁻¹`` for ``"pi"``, else dense/eigen."""
    DenseBlock, KroneckerBlock = classes_of(block)
    pair = factors(block)
    if pair is not None and damping_split == "pi":
        G, A = pair
        delta_g, delta_a = pi_split(G, A, damping)
        inverse_g = torch.linalg.inv(G + delta_g * identity_like(G))
        inverse_a = torch.linalg.inv(A + delta_a * identity_like(A))
        return KroneckerBlock(inverse_g, inverse_a, block.param_shape)
    if pair is not None:
        return SolveBlock(block, damping)
    matrix = block.to_dense()
    return DenseBlock(torch.linalg.inv(matrix + damping * identity_like(matrix)), block.param_shape)


class SolveBlock:
    """``(B + λ I)⁻¹`` of a Kronecker block through ``block.solve`` (its factors' eigendecompositions)."""

    kronecker_factors = None

    def __init__(self, block, damping: float):
        self.block, self.damping = block, damping
        self.param_shape, self.shape = tuple(block.param_shape), block.shape

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.block.solve(v, self.damping)

    def to_dense(self) -> Tensor:
        like = self.block.kronecker_factors[0]
        eye = torch.eye(self.shape[0], dtype=like.dtype, device=like.device)
        return self.block.solve(eye.reshape(-1, *self.param_shape), self.damping).reshape(self.shape).T


def block_logdet(block, damping: float, damping_split: str) -> Tensor:
    """``log det(B + λ I)`` of one block; ``ValueError`` if ``B + λ I`` is not positive definite."""
    pair = factors(block)
    if pair is not None:
        G, A = pair
        g, a = torch.linalg.eigvalsh(G), torch.linalg.eigvalsh(A)
        if damping_split == "pi":
            delta_g, delta_a = pi_split(G, A, damping)
            values = [(g + delta_g, A.shape[0]), (a + delta_a, G.shape[0])]
            check_positive(torch.cat([v for v, _ in values]))
            return sum(multiplicity * torch.log(v).sum() for v, multiplicity in values)
        values = (g[:, None] * a[None, :] + damping).reshape(-1)
    else:
        matrix = block.to_dense()
        values = torch.linalg.eigvalsh(matrix + damping * identity_like(matrix))
    check_positive(values)
    return torch.log(values).sum()


def check_positive(values: Tensor) -> None:
    if bool((values <= 0).any()):
        raise ValueError(f"logdet needs a positive definite B + λI; its smallest eigenvalue is {values.min().item():.3g}")


def block_trace(block, damping: float, damping_split: str) -> Tensor:
    """``tr(B + λ I)`` of one block."""
    pair = factors(block)
    if pair is not None:
        G, A = pair
        if damping_split == "pi":
            delta_g, delta_a = pi_split(G, A, damping)
            return (torch.trace(G) + delta_g * G.shape[0]) * (torch.trace(A) + delta_a * A.shape[0])
        return torch.trace(G) * torch.trace(A) + damping * G.shape[0] * A.shape[0]
    return torch.trace(block.to_dense()) + damping * block.shape[0]
