"""One parameter's damped Newton direction: CG on a product (``solve_cg``), a direct solve of an HBP block
(``solve_direct``), and ``EigenBlock``, a block with its eigendecomposition kept (``curvature_every``) and damped
relative to its own scale (``relative_damping``); each with the fallbacks of ``hbpc.optim.newton_cg``."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from hbpc.optim.cg import DIVERGED, NEGATIVE_CURVATURE, NON_FINITE, cg, inner
from hbpc.optim.safeguards import is_descent
from hbpc.optim.stats import ParamStats

STOPPED = (NEGATIVE_CURVATURE, NON_FINITE, DIVERGED)  # CG reasons whose iterate is a fallback
PARALLEL_TOL = 1e-5  # EigenBlock.quadratic: a vector this close to a multiple of the latest solve's answer


def damped_matvec(product: Callable[[Tensor], Tensor], alpha: float) -> Callable[[Tensor], Tensor]:
    """``v -> (1 - α) B v + α v`` for ``product = v -> B v``."""
    return lambda v: (1.0 - alpha) * product(v) + alpha * v


def solve_cg(product, g: Tensor, alpha: float, tol: float, atol: float, maxiter: int,
             x0: Tensor | None = None, M=None) -> tuple[Tensor, ParamStats]:
    """Direction ``d ≈ -[(1 - α) B + α I]⁻¹ g`` by CG (optionally warm-started at ``x0``, preconditioned
    by ``M``), with the fallbacks of the module docstring."""
    d, info = cg(damped_matvec(product, alpha), -g, x0=x0, tol=tol, atol=atol, maxiter=maxiter, M=M)
    fallback = "best iterate" if info.reason in STOPPED else None
    if not bool(d.any()) or not is_descent(g, d):
        fallback, d = "gradient", -g
    stats = ParamStats(
        info.iterations, info.residual_norm, info.converged, info.negative_curvature, fallback, alpha, info.reason
    )
    return d, stats


def solve_direct(block, g: Tensor, alpha: float, relative: bool = False) -> tuple[Tensor, ParamStats]:
    """Direction ``d = -block.solve(g, λ) / (1 - α)`` with ``λ = α / (1 - α)``; ``relative``: ``d = -(B + D_λ)⁻¹ g /
    (1 - α)`` with the block-relative damping ``D_λ`` of ``EigenBlock.solve_relative``. ``-g / c`` (``c`` the block's
    mean eigenvalue with ``relative``, else 1) when that fails or is no better than 0."""
    scale = damping_scale(block) if relative else 1.0
    lam = alpha / (1.0 - alpha)
    try:
        d = (block.solve_relative(-g, lam) if relative else block.solve(-g, lam)) / (1.0 - alpha)
    except torch.linalg.LinAlgError:
        return -g / scale, ParamStats(0, math.inf, False, False, "gradient", alpha, "singular block")
    if not is_descent(g, d):
        return -g / scale, ParamStats(0, math.inf, False, True, "gradient", alpha, "not a descent direction")
    if relative:  # (B + D_λ) is positive definite by construction: a descent direction is all to check
        return d, ParamStats(0, 0.0, True, False, None, alpha, "direct")
    residual = (g + (1.0 - alpha) * (block @ d) + alpha * d).norm().item()
    if not residual <= g.norm().item():
        return -g, ParamStats(0, residual, False, False, "gradient", alpha, "singular block")
    return d, ParamStats(0, residual, True, False, None, alpha, "direct")


def damping_scale(block) -> float:
    """``c = tr(B) / n``, the mean eigenvalue of an ``(n, n)`` block (``tr(A ⊗ B) = tr(A) tr(B)``); 1 when it is 0
    or not finite, or the block has no cheap trace."""
    trace = getattr(block, "trace", None)
    c = trace() / block.numel if trace is not None else 1.0
    return c if math.isfinite(c) and c > 0.0 else 1.0


class EigenBlock:
    """An HBP block with its eigendecomposition kept, so that ``solve`` for any damping costs rotations only.

    Kronecker blocks ``A ⊗ B`` (``B = R Rᵀ`` from a thin root ``R``: ``B = U diag(s²) Uᵀ``)::

        (A ⊗ B + λ I)⁻¹ vec(X) = vec(Qa [(Qaᵀ X Qb) / (λa λbᵀ + λ)] Qbᵀ + (X - X Qb Qbᵀ) / λ)

    (the last term is zero unless ``Qb`` is thin); dense blocks ``B = Q diag(λ) Qᵀ``; any other block uses its
    own ``solve``. Products go to the block.
    """

    def __init__(self, block, shared: dict | None = None):
        self.block, self.param_shape = block, tuple(block.param_shape)
        self.numel = math.prod(self.param_shape)
        self.kronecker_factors = block.kronecker_factors
        self.shared = {} if shared is None else shared
        self.eigen = None
        self.traced: float | None = None
        self.solved: tuple[Tensor, float] | None = None  # (latest solve's answer, its outᵀ B out)

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.block @ v

    def trace(self) -> float:
        """``tr(B)``: ``tr(A) tr(B)`` of a Kronecker block (``tr(R Rᵀ) = ‖R‖²``), the diagonal's sum of a dense one
        (computed once)."""
        if self.traced is None:
            self.traced = self.compute_trace()
        return self.traced

    def compute_trace(self) -> float:
        """``trace()``'s value."""
        block = self.block
        if hasattr(block, "R"):
            return (block.A.diagonal().sum() * block.R.square().sum()).item()
        if self.kronecker_factors is not None:
            return (self.kronecker_factors[0].diagonal().sum() * self.kronecker_factors[1].diagonal().sum()).item()
        if hasattr(block, "matrix"):
            return block.matrix.diagonal().sum().item()
        return math.nan

    @torch.no_grad()
    def solve_relative(self, rhs: Tensor, lam: float) -> Tensor:
        """``(B + D_λ)⁻¹ rhs`` with damping relative to the block's scale (K-FAC's factored Tikhonov, Martens &
        Grosse 2015, Sec. 6.3, with π from the factors' mean eigenvalues ``a = tr(A)/m``, ``b = tr(B)/n``)::

            A ⊗ B + D_λ = (A + √λ a I) ⊗ (B + √λ b I),     dense B: B + λ (tr(B)/n) I

        so every block is damped in its own units (λ ab on the identity: ``ab`` is the block's mean eigenvalue),
        and a tiny early-layer curvature is not swamped by an absolute ``λ``. As in K-FAC, through the damped factors'
        explicit inverses (Cholesky; kept per ``λ``, so a step that reuses the block costs ``(A + √λ a I)⁻¹ X`` and
        ``X (B + √λ b I)⁻¹``: two matrix products, where the eigenbasis of ``solve`` needs four). A thin root
        ``B = R Rᵀ = U diag(s²) Uᵀ`` (``R``: ``(n, r)``, ``r < n``) needs no ``(n, n)`` inverse::

            X (B + γ I)⁻¹ = (X U) diag(1/(s² + γ) - 1/γ) Uᵀ + X / γ

        A dense block ``M`` is solved by ``(M + λ (tr(M)/n) I)⁻¹``, kept the same way."""
        factors = self.kronecker_factors
        if factors is None and not hasattr(self.block, "matrix"):
            return self.block.solve(rhs, lam * damping_scale(self))
        if factors is None:
            matrix = self.block.matrix
            shift = lam * self.trace() / self.numel
            inverse = self.cached(("inverse", shift), matrix, lambda: damped_inverse(matrix, shift))
            return (inverse @ rhs.reshape(-1)).reshape(rhs.shape)
        block, A = self.block, factors[0]
        m = A.shape[0]
        X = rhs.reshape(m, -1)
        n = X.shape[1]
        root = math.sqrt(lam)
        ga = root * A.diagonal().sum().item() / m
        A_inv = self.cached(("inverse", ga), A, lambda: damped_inverse(A, ga))
        if hasattr(block, "R"):
            U, s = self.cached(("svd",), block.R, lambda: thin_eigen(block.R))
            gb = root * (s * s).sum().item() / n
            XU = X @ U
            right = (XU * (1.0 / (s * s + gb) - 1.0 / gb)) @ U.T + X / gb
        else:
            B = factors[1]
            gb = root * B.diagonal().sum().item() / n
            right = X @ self.cached(("inverse", gb), B, lambda: damped_inverse(B, gb))
        return (A_inv @ right).reshape(rhs.shape)

    def cached(self, what: tuple, M: Tensor, make: Callable[[], object]):
        """``make()`` once per matrix ``M`` and ``what`` among the blocks sharing ``shared`` (a Linear layer's bias
        block is its weight's output factor: the same tensor)."""
        key = (*what, M.data_ptr(), tuple(M.shape), M.stride(), M.dtype)
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]

    @torch.no_grad()
    def decomposition(self):
        """``(λ, Q)`` of a dense block, ``(λa, Qa, λb, Qb)`` of a Kronecker block, ``None`` otherwise."""
        if self.eigen is None:
            block = self.block
            try:
                self.eigen = self.factorize(block)
            except torch.linalg.LinAlgError:  # eigh did not converge: the block's own solve (or -g) instead
                self.eigen = ()
        return self.eigen or None

    def factorize(self, block) -> tuple:
        """The eigenpairs of ``decomposition``; ``()`` for a block without factors or matrix."""
        if hasattr(block, "R"):
            U, s = self.cached(("svd",), block.R, lambda: thin_eigen(block.R))
            return (*self.eigh(block.A), s * s, U)
        if self.kronecker_factors is not None:
            return (*self.eigh(self.kronecker_factors[0]), *self.eigh(self.kronecker_factors[1]))
        if hasattr(block, "matrix"):
            return self.eigh(block.matrix)
        return ()

    def eigh(self, M: Tensor) -> tuple[Tensor, Tensor]:
        """``torch.linalg.eigh(M)``, once per matrix among the blocks sharing ``shared`` (a Linear layer's bias block
        is its weight's output factor: the same tensor)."""
        return self.cached(("eigh",), M, lambda: tuple(torch.linalg.eigh(M)))

    @torch.no_grad()
    def solve(self, rhs: Tensor, damping: float) -> Tensor:
        """``(B + damping · I)⁻¹ rhs`` for ``rhs`` shaped like θ."""
        eigen = self.decomposition()
        if eigen is None:
            return self.block.solve(rhs, damping)
        if len(eigen) == 2:
            lam, Q = eigen
            core = (Q.T @ rhs.reshape(-1)) / (lam + damping)
            return self.remember((Q @ core).reshape(rhs.shape), core, lam)
        la, Qa, lb, Qb = eigen
        X = rhs.reshape(Qa.shape[0], -1)
        XQ = X @ Qb
        scale = la[:, None] * lb[None, :]
        core = (Qa.T @ XQ) / (scale + damping)
        out = Qa @ core @ Qb.T
        if Qb.shape[1] < Qb.shape[0]:
            out = out + (X - XQ @ Qb.T) / damping
        return self.remember(out.reshape(rhs.shape), core, scale)

    def remember(self, out: Tensor, core: Tensor, eigenvalues: Tensor) -> Tensor:
        """Keep ``out`` and ``outᵀ B out = Σ core² λ`` (``core``: ``out``'s coordinates in the eigenbasis, ``λ`` the
        eigenvalues; the complement of a thin root adds nothing, ``B`` is zero there) for ``quadratic``."""
        self.solved = (out, inner(core * eigenvalues.clamp(min=0), core).item())
        return out

    def quadratic(self, v: Tensor) -> float:
        """``vᵀ B v``: free for a multiple ``v = c · out`` of the latest solve's answer (a step), else a product."""
        if self.solved is not None:
            out, curvature = self.solved
            oo = inner(out, out).item()
            c = inner(v, out).item() / oo if oo > 0.0 else 0.0
            if (v - c * out).norm().item() <= PARALLEL_TOL * v.norm().item():
                return c * c * curvature
        return inner(v, self.block @ v).item()


def thin_eigen(R: Tensor) -> tuple[Tensor, Tensor]:
    """``(U, s)`` of the thin SVD ``R = U diag(s) Vᵀ``: ``R Rᵀ = U diag(s²) Uᵀ``."""
    U, s, _ = torch.linalg.svd(R, full_matrices=False)
    return U, s


def damped_inverse(M: Tensor, shift: float) -> Tensor:
    """``(M + shift · I)⁻¹`` of a positive semi-definite ``M`` (eigenvalues below 0 from round-off count as 0)."""
    L, info = torch.linalg.cholesky_ex(M + shift * torch.eye(M.shape[0], dtype=M.dtype, device=M.device))
    if int(info) == 0:
        return torch.cholesky_inverse(L)
    lam, Q = torch.linalg.eigh(M)
    return (Q / (lam.clamp(min=0) + shift)) @ Q.T


def quadratic(operator, v: Tensor, source: str) -> float:
    """``vᵀ B v`` for a Block, an ``EigenBlock`` (free along its latest answer) or a block product."""
    if isinstance(operator, EigenBlock):
        return operator.quadratic(v)
    return inner(v, as_product(operator, source)(v)).item()


def as_product(operator, source: str) -> Callable[[Tensor], Tensor]:
    """``v -> B v`` from a ``Block`` (``source="blocks"``) or a block-product callable."""
    return (lambda v: operator @ v) if source == "blocks" else operator
