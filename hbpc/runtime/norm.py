"""Normalizations: a map acting on groups of D normalized entries.

A sample's tensor is seen as (G, D), per-sample matrices as (N, G, D, D), block-diagonal over the G groups.
"""
import torch

from .helpers import eigh_upcast, lead_shape, numel, residual


def grouped_matrices(product, like, x_shape, groups):
    """The per-sample matrices M_n (N, G, D, D) of a map acting within groups, from its product on the identity."""
    N, D = like.shape[0], numel(x_shape) // groups
    eye = torch.eye(D, dtype=like.dtype, device=like.device)
    basis = eye.reshape(D, 1, 1, D).expand(D, N, groups, D).reshape(D, N, *x_shape)
    return product(basis).reshape(D, N, groups, D).permute(1, 2, 3, 0)


def grouped_product(M, t, x_shape):
    """M_n t_n for per-sample matrices M (N, G, D, D) and t (*lead, N, *x)."""
    lead = lead_shape(t, len(x_shape))
    out = torch.einsum("ngab,...ngb->...nga", M, t.reshape(*lead, *M.shape[1:3]))
    return out.reshape(t.shape)


def matrix_residual(R, curvature):
    """mode(R) for symmetric R (..., D, D): R (hessian), None (ggn), Q|Λ|Qᵀ (pch-abs), Q max(Λ, 0) Qᵀ (pch-clip)."""
    if curvature in ("hessian", "ggn"):
        return residual(R, curvature)
    values, vectors = eigh_upcast((R + R.mT) / 2)  # float32 for float16/bfloat16
    return (vectors * residual(values, curvature)[..., None, :]) @ vectors.mT


def grouped_input_curvature(S, J, R, average, curvature):
    """S_x for per-sample Jacobians J (N, G, D, D) acting within groups and the residuals R_n (N, G, D, D).

    E[J]ᵀ S E[J] (average) or (1/N) Σ_n J_nᵀ S J_n, plus mode(Σ_n R_n); Σ_n R_n is block-diagonal,
    so its mode is taken per group. S is (G·D, G·D), and so is the result. R is a function returning the
    residuals, called only when the mode keeps them.
    """
    N, G, D, _ = J.shape
    S = S.reshape(G, D, G, D)
    if average:
        E = J.mean(0)
        S_x = torch.einsum("gab,gahc,hcd->gbhd", E, S, E)
    else:
        S_x = torch.einsum("ngab,gahc,nhcd->gbhd", J, S, J) / N
    S_x = S_x.reshape(G * D, G * D).contiguous()
    if curvature == "ggn":
        return S_x
    return S_x + torch.block_diag(*matrix_residual(R().sum(0), curvature))


def grouped_mean_transpose(J, M):
    """E[J]ᵀ M for per-sample Jacobians J (N, G, D, D) acting within groups and a (G·D, k) matrix M: (G·D, k)."""
    E = J.mean(0)
    G, D = E.shape[:2]
    return torch.einsum("gab,gak->gbk", E, M.reshape(G, D, -1)).reshape(G * D, -1).contiguous()
