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


# ---------------------------------------------------------------------------
# Argument and state checks: one clear error naming the argument, what was expected and what was passed.
# Shape and dtype comparisons only, one min/max for class labels, one row sum for probability targets.
# ---------------------------------------------------------------------------


def describe(value):
    """What was passed, for error messages: a tensor's shape, dtype and device, else its type."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"a {type(value).__name__}"


def check_tensor(name, value, like=None):
    """value is a tensor with like's dtype and device (no silent casts or transfers); returns value."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {describe(value)}")
    if like is not None and value.dtype != like.dtype:
        raise TypeError(f"{name} must have dtype {like.dtype} (the parameters' dtype), got {describe(value)}")
    if like is not None and value.device != like.device:
        raise ValueError(f"{name} must be on {like.device} (the parameters' device), got {describe(value)}")
    return value


def check_vector(name, v, param_shape, like):
    """v shaped like θ or (V, *θ), of like's dtype and device; True for a single vector (no leading V)."""
    check_tensor(name, v, like)
    shape = tuple(v.shape)
    if shape == param_shape:
        return True
    if len(shape) == len(param_shape) + 1 and shape[1:] == param_shape:
        return False
    batched = "(V, " + ", ".join(map(str, param_shape)) + ")"
    raise ValueError(f"{name} must have shape {param_shape} (like the parameter) or {batched}, got {describe(v)}; "
                     "flattened or transposed vectors are not reshaped silently")


def check_model(model):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module of the compiled architecture, got {describe(model)}")
    return model


def bind(model, architecture, buffers):
    """The model's current parameters and buffers by name, checked against the compiled architecture.

    Called at every forward_backward, so a Parameter or buffer replaced on the model is used, not the old one.
    """
    params = dict(model.named_parameters())
    found = {name: tuple(p.shape) for name, p in params.items()}
    if found != architecture:
        missing = sorted(set(architecture) - set(found))
        extra = sorted(set(found) - set(architecture))
        wrong = sorted(n for n in set(found) & set(architecture) if found[n] != architecture[n])
        raise ValueError(
            f"model does not match the compiled architecture: missing {missing}, unexpected {extra}, "
            f"wrong shape {[(n, found[n], architecture[n]) for n in wrong]}; recompile with hbpc"
        )
    kinds = {(p.dtype, p.device) for p in params.values()}
    if len(kinds) > 1:
        mixed = {name: f"{p.dtype} on {p.device}" for name, p in params.items()}
        raise TypeError(f"model parameters must share one dtype and device, got {mixed}")
    named_buffers = dict(model.named_buffers())
    missing_buffers = sorted(set(buffers) - set(named_buffers))
    if missing_buffers:
        raise ValueError(f"model lacks the buffers {missing_buffers}; recompile with hbpc")
    return params, named_buffers


def check_eval_mode(model, paths):
    """Refuse training mode for the modules compiled as their eval-mode map (Dropout, BatchNorm) at ``paths``;
    ``'*'`` (functional dropout, whose training flag the trace read as a constant) stands for every module."""
    if not paths:
        return
    training = [name or "model" for name, module in model.named_modules()
                if module.training and ("*" in paths or name in paths)]
    if training:
        raise RuntimeError(
            f"model is in training mode ({', '.join(training[:4])}{', ...' if len(training) > 4 else ''} have "
            "training=True), but its Dropout/BatchNorm were compiled as their eval-mode maps (hbpc has no curvature "
            "for random dropout or batch statistics); call model.eval() before forward_backward"
        )


def check_input(x, input_shape, like):
    """x: (N, *input_shape), N >= 1, the parameters' dtype and device (like: a parameter, or None), finite."""
    check_tensor("x", x)
    if x.dim() != len(input_shape) + 1 or tuple(x.shape[1:]) != input_shape or x.shape[0] == 0:
        raise ValueError(f"x must have shape (N, *{input_shape}) with N >= 1 (x has per-sample shape "
                         f"{tuple(x.shape[1:])}, expected {input_shape}), got {describe(x)}")
    check_tensor("x", x, like)
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():  # a finite sum has finite terms
        raise ValueError("x contains NaN or Inf")


def check_class_target(target, N, classes, probabilities, device):
    """Class labels (N,) of an integer dtype in [0, C), or (probabilities=True) rows of p (N, C) summing to 1.

    Returns the one-hot or probability targets t (N, C) in float64 (cast to the logits' dtype by the caller).
    """
    check_tensor("target", target)
    if target.device != device:
        raise ValueError(f"target must be on {device} (the parameters' device), got {describe(target)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        if probabilities and target.is_floating_point() and tuple(target.shape) == (N, classes):
            error = (target.sum(-1) - 1).abs().max()
            tolerance = torch.finfo(target.dtype).eps ** 0.5
            if not error <= tolerance:
                raise ValueError(f"target holds class probabilities of shape (N, C) = ({N}, {classes}) whose rows "
                                 f"must sum to 1, but a row is off by {float(error):.3g}")
            return target
        expected = (f"or class probabilities of shape (N, C) = ({N}, {classes}) with rows summing to 1"
                    if probabilities else "(this loss takes no probability targets)")
        raise TypeError(f"target must hold class labels of an integer dtype, shape (N,) = ({N},), {expected}; "
                        f"got {describe(target)}")
    if tuple(target.shape) != (N,):
        raise ValueError(f"target must have shape (N,) = ({N},) with N = x.shape[0] (one class label per sample), "
                         f"got {describe(target)}")
    low, high = torch.aminmax(target)
    if low < 0 or high >= classes:
        raise ValueError(f"target must hold class labels in [0, {classes - 1}] (C = {classes} classes), got labels "
                         f"from {int(low)} to {int(high)}")
    return torch.nn.functional.one_hot(target.long(), classes)


def check_dense_target(target, N, y_shape, device):
    """Targets of the model output's shape (N, *y): no broadcasting, as torch's losses would silently do."""
    check_tensor("target", target)
    if target.device != device:
        raise ValueError(f"target must be on {device} (the parameters' device), got {describe(target)}")
    if target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must be a real tensor, got {describe(target)}")
    if tuple(target.shape) != (N, *y_shape):
        raise ValueError(f"target must have the output's shape (N, *{y_shape}) = {(N, *y_shape)} with N = x.shape[0]"
                         f" (no broadcasting), got {describe(target)}")
    return target


def tensor_state(model, inputs):
    """What forward_backward's cache depends on: the module tree, every parameter's and buffer's identity and
    version counter, and the inputs' version counters (in-place changes through ``.data`` bypass the counters).

    Recorded as direct references to the modules' own dicts, so ``check_state`` costs a few dict lookups.
    """
    modules = list(model.named_modules())
    children = [(f"{prefix}.{key}" if prefix else key, parent._modules, key, child)
                for prefix, parent in modules for key, child in parent._modules.items()]
    tensors = [(f"{prefix}.{key}" if prefix else key, slots, key, t, t._version) for prefix, module in modules
               for slots in (module._parameters, module._buffers) for key, t in slots.items() if t is not None]
    return children, tensors, [(name, t, t._version) for name, t in inputs]


def check_state(state):
    """Refuse when the model or the inputs changed since forward_backward (its cache would mix two points)."""
    children, tensors, inputs = state
    again = "; call forward_backward(x, target) again before asking for curvature"
    for name, slots, key, child in children:
        if slots.get(key) is not child:
            raise RuntimeError(f"submodule {name} was replaced on the model since forward_backward{again}")
    for name, slots, key, tensor, version in tensors:
        if slots.get(key) is not tensor:
            raise RuntimeError(f"{name} was replaced on the model since forward_backward{again}")
        if tensor._version != version:
            raise RuntimeError(f"{name} was changed in place since forward_backward (e.g. by optimizer.step()){again}")
    for name, tensor, version in inputs:
        if tensor._version != version:
            raise RuntimeError(f"{name} was changed in place since forward_backward{again}")


def check_flag(name, value):
    """A bool option (a positional int here is usually a misplaced ``split``)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}; pass split and the others by keyword")


def check_samples(samples):
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int (sampled labels per input), got {samples!r}")


def check_damping(damping):
    """damping: a finite real number >= 0."""
    if isinstance(damping, torch.Tensor) and damping.numel() == 1:
        damping = damping.item()
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < float("inf"):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")


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
        single = check_vector("v", v, self.param_shape, self._like)
        out = self._matmat(v.reshape(-1, self.numel))
        return out.reshape(v.shape) if not single else out.reshape(self.param_shape)

    @torch.no_grad()
    def to_dense(self):
        """The (numel, numel) matrix."""
        eye = torch.eye(self.numel, dtype=self._like.dtype, device=self._like.device)
        return self._matmat(eye).T

    def _check_solve(self, rhs, damping):
        check_vector("rhs", rhs, self.param_shape, self._like)
        check_damping(damping)

    @torch.no_grad()
    def solve(self, rhs, damping):
        """(B + damping·I)⁻¹ rhs, rhs shaped like θ or (V, *θ); float16/bfloat16 are solved in float32."""
        self._check_solve(rhs, damping)
        flat = rhs.reshape(-1, self.numel).to(solve_dtype(rhs.dtype))
        A = self.to_dense().to(flat.dtype) + damping * torch.eye(self.numel, dtype=flat.dtype, device=flat.device)
        return torch.linalg.solve(A, flat.T).T.reshape(rhs.shape).to(rhs.dtype)

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
        self._check_solve(rhs, damping)
        work = solve_dtype(rhs.dtype)
        la, Qa = torch.linalg.eigh(self.A.to(work))
        lb, Qb = torch.linalg.eigh(self.B.to(work))
        X = rhs.reshape(-1, self.A.shape[0], self.B.shape[0]).to(work)
        rotated = Qa.T @ X @ Qb
        return (Qa @ (rotated / (la[:, None] * lb[None, :] + damping)) @ Qb.T).reshape(rhs.shape).to(rhs.dtype)


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
        self._check_solve(rhs, damping)
        work = solve_dtype(rhs.dtype)
        la, Qa = torch.linalg.eigh(self.A.to(work))
        U, s, _ = torch.linalg.svd(self.R.to(work), full_matrices=False)
        X = rhs.reshape(-1, self.A.shape[0], self.R.shape[0]).to(work)
        XU = X @ U
        inside = Qa @ ((Qa.T @ XU) / (la[:, None] * s[None, :] ** 2 + damping)) @ U.T
        return (inside + (X - XU @ U.T) / damping).reshape(rhs.shape).to(rhs.dtype)

    def part(self, start, stop):
        rows = self.factor_rows(start, stop)
        if rows is None:
            return Block.part(self, start, stop)
        return KroneckerGramBlock(self.A[rows, rows], self.R, (stop - start, *self.param_shape[1:]))


def solve_dtype(dtype):
    """The dtype eigh, svd and solve run in: float32 for float16/bfloat16 (torch has no half-precision kernels)."""
    return torch.promote_types(dtype, torch.float32)


def eigh_upcast(H):
    """torch.linalg.eigh of symmetric H in at least float32, returned in H's dtype."""
    eigenvalues, Q = torch.linalg.eigh(H.to(solve_dtype(H.dtype)))
    return eigenvalues.to(H.dtype), Q.to(H.dtype)


class OperatorBlock(Block):
    """B_θ known only through its product v -> B_θ v on tensors shaped (V, *θ)."""

    def __init__(self, product, param_shape, like):
        super().__init__(param_shape, like)
        self.product = product

    def _matmat(self, V):
        return self.product(V.reshape(-1, *self.param_shape)).reshape(V.shape)


def as_vectors(vs, shapes, like):
    """A list shaped like the parameters (all with or all without one leading V) -> ({name: (V, *θ)}, single).

    Every tensor must have like's dtype and device; a dict, a lone tensor, mixed or flattened shapes are refused.
    """
    expected = f"a list of {len(shapes)} tensors shaped like the parameters {list(shapes)}, in that order"
    if isinstance(vs, (dict, torch.Tensor, str)) or not hasattr(vs, "__iter__"):
        hint = " (pass list(vs.values()) in parameter order)" if isinstance(vs, dict) else ""
        raise TypeError(f"vs must be {expected}{hint}, got {describe(vs)}")
    vs = list(vs)
    if len(vs) != len(shapes):
        raise ValueError(f"vs must be {expected}, got {len(vs)} tensors")
    singles = [check_vector(f"vs[{i}] ({name})", v, shapes[name], like) for i, (name, v) in enumerate(zip(shapes, vs))]
    batched = {v.shape[0] for v, single in zip(vs, singles) if not single}
    if len(set(singles)) > 1 or len(batched) > 1:
        shapes_passed = [tuple(v.shape) for v in vs]
        raise ValueError(f"vs must be all single vectors (shaped like θ) or all batched with one V (V, *θ), got "
                         f"shapes {shapes_passed}")
    single = singles[0] if singles else True
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
        self._check_solve(rhs, damping)
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

    def __init__(self, product, param_shape, parts, like, check):
        self.product, self.param_shape, self.like, self.check = product, tuple(param_shape), like, check
        self.parts = [(start, stop, with_vectors(part_product(product, self.param_shape, start, stop),
                                                 (stop - start, *self.param_shape[1:]), like, check))
                      for start, stop in row_chunks(self.param_shape[0], parts)]

    @torch.no_grad()
    def __call__(self, v):
        self.check()
        single = check_vector("v", v, self.param_shape, self.like)
        v = v.unsqueeze(0) if single else v
        masked = v.new_zeros(len(self.parts), *v.shape)
        for j, (start, stop, _) in enumerate(self.parts):
            masked[j, :, start:stop] = v[:, start:stop]
        out = self.product(masked.reshape(-1, *self.param_shape)).reshape(masked.shape)
        result = torch.cat([out[j, :, start:stop] for j, (start, stop, _) in enumerate(self.parts)], 1)
        return result.squeeze(0) if single else result


def split_product(product, param_shape, parts, like, check):
    """``product`` (v -> C v on (V, *θ)) as a callable on θ or (V, *θ), split into row chunks if parts > 1.

    Every call first runs check() (the cache is current) and checks v against θ's shape and like's dtype/device.
    """
    if splittable(param_shape, parts):
        return SplitProduct(product, param_shape, parts, like, check)
    return with_vectors(product, param_shape, like, check)


def with_vectors(product, param_shape, like, check):
    """Accept v shaped like θ or (V, *θ) after check(); the generated products always see (V, *θ)."""
    param_shape = tuple(param_shape)

    @torch.no_grad()
    def apply(v):
        check()
        if check_vector("v", v, param_shape, like):
            return product(v.unsqueeze(0)).squeeze(0)
        return product(v)

    return apply
