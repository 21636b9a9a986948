# ---------------------------------------------------------------------------
# Runtime helpers shared by every generated module (copied verbatim by hbpc).
#
# Shape glossary: N batch size, V number of vectors multiplied at once,
# *x / *y a node's per-sample input / output shape, d_x / d_y their numel.
# A tangent or cotangent has shape (*lead, *x) with lead = (N,) or (V, N).
# ---------------------------------------------------------------------------
import torch

CURVATURES = ("hessian", "ggn", "pch-abs", "pch-clip")


def check_curvature(curvature):
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")


KRONECKER_KINDS = ("kfac", "kflr", "kfra")


def check_kronecker_kind(kind):
    if kind not in KRONECKER_KINDS:
        raise ValueError(f"kind must be one of {KRONECKER_KINDS}, got {kind!r}")


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
    """S_x = S ⊙ E[φ′] E[φ′]ᵀ (average) or S ⊙ E[φ′ φ′ᵀ], plus diag(mode(Σ_n r_n)): (d, d)."""
    d = d1.flatten(1)
    S_x = torch.outer(d.mean(0), d.mean(0)) if average else (d.T @ d).div_(d.shape[0])
    S_x.mul_(S)
    if r is not None:
        modified = residual(r.flatten(1).sum(0), curvature)
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


class Block:
    """A curvature block B_θ acting on tensors shaped like θ (optionally with a leading V)."""

    kronecker_factors = None

    def __init__(self, param_shape, like):
        self.param_shape = tuple(param_shape)
        self.numel = numel(self.param_shape)
        self.shape = (self.numel, self.numel)
        self._like = like

    def _matmat(self, V):
        """(V, numel) -> (V, numel): rows B v."""
        raise NotImplementedError

    @torch.no_grad()
    def __matmul__(self, v):
        single = tuple(v.shape) == self.param_shape
        out = self._matmat(v.reshape(-1, self.numel))
        return out.reshape(v.shape) if not single else out.reshape(self.param_shape)

    @torch.no_grad()
    def to_dense(self):
        """The (numel, numel) matrix."""
        eye = torch.eye(self.numel, dtype=self._like.dtype, device=self._like.device)
        return self._matmat(eye).T

    @torch.no_grad()
    def solve(self, rhs, damping):
        """(B + damping·I)⁻¹ rhs, rhs shaped like θ or (V, *θ)."""
        flat = rhs.reshape(-1, self.numel)
        A = self.to_dense() + damping * torch.eye(self.numel, dtype=flat.dtype, device=flat.device)
        return torch.linalg.solve(A, flat.T).T.reshape(rhs.shape)

    def part(self, start, stop):
        """The diagonal sub-block of rows start:stop of θ's first dimension, acting on θ[start:stop]."""
        rest = self.numel // self.param_shape[0]
        first, last = start * rest, stop * rest

        def product(v):
            full = v.new_zeros(v.shape[0], self.numel)
            full[:, first:last] = v.reshape(v.shape[0], -1)
            return self._matmat(full)[:, first:last].reshape(v.shape)

        return OperatorBlock(product, (stop - start, *self.param_shape[1:]), self._like)


class DenseBlock(Block):
    """B_θ stored as a (numel, numel) matrix."""

    def __init__(self, matrix, param_shape):
        super().__init__(param_shape, matrix)
        self.matrix = matrix

    def _matmat(self, V):
        return V @ self.matrix.T

    def to_dense(self):
        return self.matrix

    def part(self, start, stop):
        rest = self.numel // self.param_shape[0]
        rows = slice(start * rest, stop * rest)
        return DenseBlock(self.matrix[rows, rows], (stop - start, *self.param_shape[1:]))


class KroneckerBlock(Block):
    """B_θ = A ⊗ B on row-major vec(θ) with θ viewed as (a, b): B_θ vec(X) = vec(A X Bᵀ)."""

    def __init__(self, A, B, param_shape):
        super().__init__(param_shape, A)
        self.A, self.B = A, B
        self.kronecker_factors = (A, B)

    def _matmat(self, V):
        X = V.reshape(-1, self.A.shape[0], self.B.shape[0])
        return (self.A @ X @ self.B.T).reshape(V.shape)

    def to_dense(self):
        return torch.kron(self.A, self.B)

    def factor_rows(self, start, stop):
        """A's rows covering θ[start:stop] when they align with A (always so for θ viewed (out, in)), else None."""
        rest, b = self.numel // self.param_shape[0], self.numel // self.A.shape[0]
        if (start * rest) % b or (stop * rest) % b:
            return None
        return slice(start * rest // b, stop * rest // b)

    def part(self, start, stop):
        rows = self.factor_rows(start, stop)
        if rows is None:
            return Block.part(self, start, stop)
        return KroneckerBlock(self.A[rows, rows], self.B, (stop - start, *self.param_shape[1:]))

    @torch.no_grad()
    def solve(self, rhs, damping):
        """Through eigendecompositions A = Qa Λa Qaᵀ, B = Qb Λb Qbᵀ: divide by λa λb + damping."""
        la, Qa = torch.linalg.eigh(self.A)
        lb, Qb = torch.linalg.eigh(self.B)
        X = rhs.reshape(-1, self.A.shape[0], self.B.shape[0])
        rotated = Qa.T @ X @ Qb
        return (Qa @ (rotated / (la[:, None] * lb[None, :] + damping)) @ Qb.T).reshape(rhs.shape)


class KroneckerGramBlock(KroneckerBlock):
    """B_θ = A ⊗ R Rᵀ with a thin root R (b, r), r < b, as for the rank-one x̄ x̄ᵀ.

    Products cost O(a² r + a b r) instead of O(a² b + a b²); ``solve`` needs only A's
    eigendecomposition and R's thin SVD (B = U diag(s²) Uᵀ, zero on U's complement).
    """

    def __init__(self, A, R, param_shape):
        Block.__init__(self, param_shape, A)
        self.A, self.R = A, R

    @property
    def B(self):
        return self.R @ self.R.T

    @property
    def kronecker_factors(self):
        return self.A, self.B

    def _matmat(self, V):
        X = V.reshape(-1, self.A.shape[0], self.R.shape[0])
        return (self.A @ (X @ self.R) @ self.R.T).reshape(V.shape)

    @torch.no_grad()
    def solve(self, rhs, damping):
        la, Qa = torch.linalg.eigh(self.A)
        U, s, _ = torch.linalg.svd(self.R, full_matrices=False)
        X = rhs.reshape(-1, self.A.shape[0], self.R.shape[0])
        XU = X @ U
        inside = Qa @ ((Qa.T @ XU) / (la[:, None] * s[None, :] ** 2 + damping)) @ U.T
        return (inside + (X - XU @ U.T) / damping).reshape(rhs.shape)

    def part(self, start, stop):
        rows = self.factor_rows(start, stop)
        if rows is None:
            return Block.part(self, start, stop)
        return KroneckerGramBlock(self.A[rows, rows], self.R, (stop - start, *self.param_shape[1:]))


class OperatorBlock(Block):
    """B_θ known only through its product v -> B_θ v on tensors shaped (V, *θ)."""

    def __init__(self, product, param_shape, like):
        super().__init__(param_shape, like)
        self.product = product

    def _matmat(self, V):
        return self.product(V.reshape(-1, *self.param_shape)).reshape(V.shape)


def as_vectors(vs, shapes):
    """A list shaped like the parameters (optionally with a leading V) -> ({name: (V, *θ)}, single)."""
    vs = list(vs)
    if len(vs) != len(shapes):
        raise ValueError(f"expected {len(shapes)} tensors shaped like the parameters, got {len(vs)}")
    single = tuple(vs[0].shape) == tuple(shapes[next(iter(shapes))])
    return {name: (v.unsqueeze(0) if single else v) for name, v in zip(shapes, vs)}, single


def from_vectors(out, v, single):
    """Inverse of ``as_vectors``: a list in parameter order; parameters the loss ignores get zeros."""
    full = [out[name] if name in out else torch.zeros_like(v[name]) for name in v]
    return [t.squeeze(0) if single else t for t in full]


def zero_product(v, curvature):
    """The curvature block of a parameter the loss does not depend on."""
    return torch.zeros_like(v)


class SumBlock(Block):
    """The sum of blocks (a parameter used at several nodes)."""

    def __init__(self, blocks):
        super().__init__(blocks[0].param_shape, blocks[0]._like)
        self.blocks = blocks

    def _matmat(self, V):
        return sum(block._matmat(V) for block in self.blocks)

    def part(self, start, stop):
        return SumBlock([block.part(start, stop) for block in self.blocks])


def check_split(split):
    if not isinstance(split, int) or split < 1:
        raise ValueError(f"split must be a positive int (sub-blocks per parameter), got {split!r}")


def row_chunks(rows, parts):
    """(start, stop) of torch.chunk(θ, parts, 0): ⌈rows/parts⌉ rows each, the last may be smaller."""
    size = -(-rows // parts)
    return [(start, min(start + size, rows)) for start in range(0, rows, size)]


def splittable(param_shape, parts):
    return parts > 1 and len(param_shape) > 0 and param_shape[0] > 1


class SplitBlock(Block):
    """The block-diagonal part of B_θ over row chunks of θ (``split``): parts[j] = (start, stop, B_jj),
    B_jj the diagonal sub-block acting on θ[start:stop]. Products and ``solve`` work chunk by chunk."""

    def __init__(self, block, parts):
        super().__init__(block.param_shape, block._like)
        self.parts = [(start, stop, block.part(start, stop)) for start, stop in row_chunks(self.param_shape[0], parts)]

    def _matmat(self, V):
        X = V.reshape(V.shape[0], self.param_shape[0], -1)
        out = [part._matmat(X[:, start:stop].reshape(V.shape[0], -1)) for start, stop, part in self.parts]
        return torch.cat([o.reshape(V.shape[0], -1) for o in out], 1)

    @torch.no_grad()
    def solve(self, rhs, damping):
        lead = rhs.shape[: rhs.dim() - len(self.param_shape)]
        X = rhs.reshape(*lead, self.param_shape[0], -1)
        out = [part.solve(X[..., start:stop, :].reshape(*lead, *part.param_shape), damping).reshape(*lead, stop - start, -1)
               for start, stop, part in self.parts]
        return torch.cat(out, -2).reshape(rhs.shape)


def split_block(block, parts):
    """``block`` itself for parts = 1 (or a parameter with one row), else its ``SplitBlock``."""
    return SplitBlock(block, parts) if splittable(block.param_shape, parts) else block


def part_product(product, param_shape, start, stop):
    """v -> (C P v)[start:stop] for v shaped (V, *θ[start:stop]): the diagonal sub-block of a block product."""

    def apply(v):
        full = v.new_zeros(v.shape[0], *param_shape)
        full[:, start:stop] = v
        return product(full)[:, start:stop]

    return apply


class SplitProduct:
    """v -> Σ_j P_j C P_j v, the block-diagonal part of a block product over row chunks of θ (one batched
    product of split·V vectors); parts[j] = (start, stop, product of the sub-block on θ[start:stop])."""

    def __init__(self, product, param_shape, parts):
        self.product, self.param_shape = product, tuple(param_shape)
        self.parts = [(start, stop, with_vectors(part_product(product, self.param_shape, start, stop),
                                                 (stop - start, *self.param_shape[1:])))
                      for start, stop in row_chunks(self.param_shape[0], parts)]

    @torch.no_grad()
    def __call__(self, v):
        single = tuple(v.shape) == self.param_shape
        v = v.unsqueeze(0) if single else v
        masked = v.new_zeros(len(self.parts), *v.shape)
        for j, (start, stop, _) in enumerate(self.parts):
            masked[j, :, start:stop] = v[:, start:stop]
        out = self.product(masked.reshape(-1, *self.param_shape)).reshape(masked.shape)
        result = torch.cat([out[j, :, start:stop] for j, (start, stop, _) in enumerate(self.parts)], 1)
        return result.squeeze(0) if single else result


def split_product(product, param_shape, parts):
    """``product`` (v -> C v on (V, *θ)) as a callable on θ or (V, *θ), split into row chunks if parts > 1."""
    if splittable(param_shape, parts):
        return SplitProduct(product, param_shape, parts)
    return with_vectors(product, param_shape)


def with_vectors(product, param_shape):
    """Accept v shaped like θ or (V, *θ); the generated products always see (V, *θ)."""

    @torch.no_grad()
    def apply(v):
        if tuple(v.shape) == tuple(param_shape):
            return product(v.unsqueeze(0)).squeeze(0)
        return product(v)

    return apply
