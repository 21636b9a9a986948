"""Curvature blocks (dense, Kronecker, matrix-free, summed, split) and the products' vector plumbing."""
import torch

from .checks import check_damping, check_vector, describe
from .helpers import numel, solve_dtype


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
