"""Products of two activations (``Bilinear`` nodes): per-sample Jacobians and the residual that couples the operands.

A node ``y = f(a, b)`` linear in each operand has Jacobians ``J_a``, ``J_b`` that depend on the sample (each reads
the other operand) and no residual within an operand; its residual couples them: per sample the joint residual over
``(a, b)`` is ``[[0, M_n], [M_nᵀ, 0]]`` with ``M_n t_b = Σ_k g_k ∂²y_k/∂a∂b t_b``. Matrices are (N, d_out, d_in).
"""
import torch

from .helpers import lead_shape, numel, solve_dtype


def per_sample_matrices(product, like, x_shape):
    """M_n (N, d_out, d_in) of a per-sample linear map from its product on the identity; like: (N, ...)."""
    N, d = like.shape[0], numel(x_shape)
    eye = torch.eye(d, dtype=like.dtype, device=like.device)
    basis = eye.reshape(d, 1, d).expand(d, N, d).reshape(d, N, *x_shape)
    return product(basis).reshape(d, N, -1).permute(1, 2, 0)


def dependent_input_curvature(S, J, average, residual=None):
    """S_x = E[J]ᵀ S E[J] (average) or (1/N) Σ_n J_nᵀ S J_n for J (N, d_y, d_x), plus residual (d_x, d_x) if any."""
    if average:
        E = J.mean(0)
        S_x = E.T @ S @ E
    else:
        S_x = torch.einsum("nab,ac,ncd->bd", J, S, J).div(J.shape[0]).contiguous()
    return S_x if residual is None else S_x + residual


def dependent_cross(S, J_a, J_b, residual=None):
    """E[J_a]ᵀ S E[J_b] for two inputs of one node (d_a, d_b), plus their residual block if any."""
    cross = J_a.mean(0).T @ S @ J_b.mean(0)
    return cross if residual is None else cross + residual


def dependent_mean_transpose(J, M):
    """E[J]ᵀ M for per-sample Jacobians J (N, d_y, d_x) and a (d_y, k) matrix M: (d_x, k)."""
    return J.mean(0).T @ M


def bilinear_residual_modes(M, curvature):
    """mode of the joint residual R = [[0, M], [Mᵀ, 0]] for M (..., d_a, d_b), as blocks (R_aa, R_ab, R_bb).

    hessian: (None, M, None); ggn: all None (None is a zero block). From M = U Σ Vᵀ, R has eigenvalues ±σ with
    eigenvectors (u, ±v)/√2, so pch-abs: |R| = (U Σ Uᵀ, None, V Σ Vᵀ) and pch-clip: max(R, 0) = (|R| + R)/2.
    The SVD runs in float32 for float16/bfloat16.
    """
    if curvature == "ggn":
        return None, None, None
    if curvature == "hessian":
        return None, M, None
    U, sigma, Vh = torch.linalg.svd(M.to(solve_dtype(M.dtype)), full_matrices=False)
    aa = ((U * sigma[..., None, :]) @ U.mT).to(M.dtype)
    bb = ((Vh.mT * sigma[..., None, :]) @ Vh).to(M.dtype)
    if curvature == "pch-abs":
        return aa, None, bb
    return aa / 2, M / 2, bb / 2


def bilinear_mode_product(modes, tangents, x_shapes):
    """mode(R_n) t per sample for the blocks of ``bilinear_residual_modes`` (each (N, d, d')) and the operands'
    tangents (*lead, N, *x_i), None where an operand has none: [(R t)_a, (R t)_b], None where a term is zero."""
    aa, ab, bb = modes
    t_a, t_b = (None if t is None else t.reshape(*lead_shape(t, len(shape)), -1) for t, shape in zip(tangents, x_shapes))
    terms_a = [(aa, t_a, "nij,...nj->...ni"), (ab, t_b, "nij,...nj->...ni")]
    terms_b = [(ab, t_a, "nji,...nj->...ni"), (bb, t_b, "nij,...nj->...ni")]
    out = []
    for terms, shape in zip((terms_a, terms_b), x_shapes):
        parts = [torch.einsum(spec, M, t) for M, t, spec in terms if M is not None and t is not None]
        out.append(None if not parts else sum(parts[1:], parts[0]).reshape(*parts[0].shape[:-1], *shape))
    return out
