"""Tensor helpers the generated per-node methods call: views, selections, residuals and HBP sandwiches.

Shape glossary: N batch size, V number of vectors multiplied at once, *x / *y a node's per-sample input /
output shape, d_x / d_y their numel. A tangent or cotangent has shape (*lead, *x) with lead = (N,) or (V, N).
"""
import torch


def residual(r, curvature):
    """The residual term under a curvature mode: r (hessian), None (ggn), |r| (pch-abs), max(r, 0) (pch-clip)."""
    if curvature == "ggn":
        return None
    if curvature == "pch-abs":
        return r.abs()
    if curvature == "pch-clip":
        return r.clamp(min=0)
    return r


def residual_product(r, t, curvature):
    """R t for a diagonal residual R = diag(r) under the curvature mode (0 for ggn)."""
    modified = residual(r, curvature)
    return 0 if modified is None else modified * t


def broadcast_trailing(t, shape):
    """Expand size-1 axes: (*lead, *s) -> (*lead, *shape)."""
    return t.expand(*t.shape[: t.dim() - len(shape)], *shape)


def lead_shape(t, sample_dims):
    """The leading (V, N) or (N,) part of a tensor with sample_dims per-sample dimensions."""
    return t.shape[: t.dim() - sample_dims]


def patches(x, kernel_size, stride, padding, dilation):
    """unfold: (*lead, C, H, W) -> (*lead, C*K, L), K = kh*kw kernel offsets, L output locations."""
    lead = lead_shape(x, 3)
    unfolded = torch.nn.functional.unfold(x.reshape(-1, *x.shape[-3:]), kernel_size, dilation, padding, stride)
    return unfolded.reshape(*lead, *unfolded.shape[1:])


def patches_adjoint(p, x_shape, kernel_size, stride, padding, dilation):
    """fold, the adjoint of ``patches``: (*lead, C*K, L) -> (*lead, C, H, W)."""
    lead = lead_shape(p, 2)
    folded = torch.nn.functional.fold(p.reshape(-1, *p.shape[-2:]), x_shape[-2:], kernel_size, dilation, padding, stride)
    return folded.reshape(*lead, *x_shape)


def max_pool2d_with_indices(x, kernel_size, stride, padding, dilation):
    """y = max over each window; idx (N, C, H', W') records the argmax as a flat index into H*W."""
    return torch.nn.functional.max_pool2d(x, kernel_size, stride, padding, dilation, return_indices=True)


def take_jvp(v, idx):
    """J v for a recorded selection: y[n, c, l] = x[n, c, idx[n, c, l]]."""
    flat = v.flatten(-2)
    index = idx.flatten(-2).expand(*flat.shape[:-1], -1)
    return flat.gather(-1, index).reshape(*v.shape[:-2], *idx.shape[-2:])


def take_vjp(u, idx, x_shape):
    """Jᵀ u for a recorded selection: scatter-add u into the selected positions."""
    flat = u.flatten(-2)
    index = idx.flatten(-2).expand(*flat.shape[:-1], -1)
    out = flat.new_zeros(*flat.shape[:-1], x_shape[-2] * x_shape[-1])
    return out.scatter_add(-1, index, flat).reshape(*u.shape[:-3], *x_shape)


def pad_jvp(v, padding):
    return torch.nn.functional.pad(v, padding)


def pad_vjp(u, padding):
    """Crop, the adjoint of zero padding (left, right, top, bottom, ...) on the trailing dimensions."""
    slices = [slice(None)] * u.dim()
    for axis, (before, after) in enumerate(zip(padding[0::2], padding[1::2])):
        dim = u.dim() - 1 - axis
        slices[dim] = slice(before, u.shape[dim] - after)
    return u[tuple(slices)]


def reshape_to(t, old_shape, new_shape):
    """(*lead, *old_shape) -> (*lead, *new_shape)."""
    return t.reshape(*lead_shape(t, len(old_shape)), *new_shape)


def accumulate_grad(param, grad):
    """param.grad += grad, as loss.backward() does (frozen parameters keep grad None).

    grad is stored without a copy: the parameter vjps sum over samples, so it is a fresh tensor that
    nothing else holds (never a view of a cached tensor, which a later in-place update of p.grad would change).
    """
    if param.requires_grad:
        param.grad = grad if param.grad is None else param.grad + grad


def numel(shape):
    total = 1
    for size in shape:
        total *= size
    return total


def apply_per_sample(S, t, y_shape):
    """S applied to every sample's slice: (*lead, *y) -> (*lead, *y), S is (d_y, d_y)."""
    flat = t.reshape(*lead_shape(t, len(y_shape)), -1)
    return (flat @ S).reshape(t.shape)


def batch_mean(X, average):
    """E[X] over the batch as a batch of one (average=True), else X itself."""
    return X.mean(0, keepdim=True) if average else X


def transpose_matrix(M, vjp, y_shape):
    """Jᵀ M for a sample-independent linear map and a (d_y, k) matrix M: (d_x, k)."""
    k = M.shape[1]
    return vjp(M.T.reshape(k, 1, *y_shape)).reshape(k, -1).T.contiguous()


def cross_independent(S, vjp_a, vjp_b, xa_shape, xb_shape, y_shape):
    """J_aᵀ S J_b for two sample-independent linear maps out of the same output: (d_xa, d_xb)."""
    S_Jb = transpose_matrix(S, vjp_b, y_shape).T  # (d_y, d_xb), S symmetric
    return transpose_matrix(S_Jb, vjp_a, y_shape)


def sandwich_independent(S, vjp, x_shape, y_shape, chunk_entries=2**22):
    """S_x = Jᵀ S J for a sample-independent linear map and a symmetric S: (d_x, d_x).

    Two passes of the vjp over rows, chunk_entries entries of rows in and out at a time: the rows of S give
    S J (row i is Jᵀ S[i]), the rows of (S J)ᵀ give Jᵀ S J. Holds S J and S_x, no transposed copies.
    """
    d_x = numel(x_shape)
    step = max(1, chunk_entries // (d_x + numel(y_shape)))

    def rows_through(M):
        out = M.new_empty(M.shape[0], d_x)
        for start in range(0, M.shape[0], step):
            rows = M[start:start + step]
            out[start:start + step] = vjp(rows.reshape(rows.shape[0], 1, *y_shape)).reshape(rows.shape[0], d_x)
        return out

    return rows_through(rows_through(S).T)


def weight_sandwich(S, W):
    """S_x = Wᵀ S W for a map whose Jacobian is the weight W (d_y, d_x): two gemms."""
    return W.T @ S @ W


def take_mean_transpose(M, idx, x_shape):
    """E[P]ᵀ M for a recorded selection (the mean of the per-sample selection matrices): (d_x, k)."""
    N, d_y = idx.shape[0], M.shape[0]
    plane = x_shape[-2] * x_shape[-1]
    channel = torch.arange(x_shape[0], device=idx.device).reshape(1, -1, 1) * plane
    cols = (idx.flatten(2) + channel).reshape(N, d_y)
    out = M.new_zeros(numel(x_shape), M.shape[1])
    return out.index_add_(0, cols.flatten(), M.repeat(N, 1)) / N


def cat_tangents(tangents, x_shapes, axis):
    """torch.cat of input tangents along ``axis`` (from the end), zeros for inputs without one."""
    like = next(t for t in tangents if t is not None)
    lead = lead_shape(like, len(x_shapes[tangents.index(like)]))
    parts = [t if t is not None else like.new_zeros(*lead, *shape) for t, shape in zip(tangents, x_shapes)]
    return torch.cat(parts, axis)


def elementwise_input_curvature(S, d1, r, average, curvature):
    """S_x = S ⊙ E[φ′] E[φ′]ᵀ (average) or S ⊙ E[φ′ φ′ᵀ], plus diag(mode(Σ_n r_n)): (d, d).

    r: a function returning the residual coefficients (N, *x), called only when the mode keeps them, or None.
    """
    d = d1.flatten(1)
    S_x = torch.outer(d.mean(0), d.mean(0)) if average else (d.T @ d).div_(d.shape[0])
    S_x.mul_(S)
    if r is not None and curvature != "ggn":
        modified = residual(r().flatten(1).sum(0), curvature)
        if modified is not None:
            S_x.diagonal().add_(modified)
    return S_x


def take_input_curvature(S, idx, x_shape, average, chunk_entries=2**22):
    """S_x for a recorded selection P_n: E[P]ᵀ S E[P] (average) or (1/N) Σ_n P_nᵀ S P_n."""
    N, d_y, d_x = idx.shape[0], S.shape[0], numel(x_shape)
    plane = x_shape[-2] * x_shape[-1]
    channel = torch.arange(x_shape[0], device=idx.device).reshape(1, -1, 1) * plane
    cols = (idx.flatten(2) + channel).reshape(N, d_y)
    if average:
        rows = torch.arange(d_y, device=idx.device).expand(N, d_y)
        E = S.new_zeros(d_y, d_x).index_put_((rows, cols), S.new_full((N, d_y), 1.0 / N), accumulate=True)
        return E.T @ S @ E
    S_x = S.new_zeros(d_x, d_x)
    step = max(1, min(chunk_entries, d_x * d_x) // max(1, d_y * d_y))  # index chunks no larger than S_x
    for start in range(0, N, step):
        c = cols[start:start + step]
        m = c.shape[0]
        S_x.index_put_((c[:, :, None].expand(m, d_y, d_y), c[:, None, :].expand(m, d_y, d_y)),
                       S.expand(m, d_y, d_y), accumulate=True)
    return S_x / N


def solve_dtype(dtype):
    """The dtype eigh, svd and solve run in: float32 for float16/bfloat16 (torch has no half-precision kernels)."""
    return torch.promote_types(dtype, torch.float32)


def eigh_upcast(H):
    """torch.linalg.eigh of symmetric H in at least float32, returned in H's dtype."""
    eigenvalues, Q = torch.linalg.eigh(H.to(solve_dtype(H.dtype)))
    return eigenvalues.to(H.dtype), Q.to(H.dtype)


def fixed_mask(masked, shape, device):
    """The boolean mask (per-sample ``shape``) of a constant masked_fill: "causal" (entry (i, j) of the last two axes
    where j > i, for every leading index) or the flat indices of the masked entries."""
    if masked == "causal":
        return torch.ones(shape[-2:], dtype=torch.bool, device=device).triu(1).expand(shape)
    mask = torch.zeros(numel(shape), dtype=torch.bool, device=device)
    mask[list(masked)] = True
    return mask.reshape(shape)


def masked_curvature(S, mask):
    """S_x = P S P for P = diag(keep), the Jacobian of a masked_fill: S with masked rows and columns zeroed."""
    flat = mask.reshape(-1)
    return S.masked_fill(flat[:, None] | flat[None, :], 0)
