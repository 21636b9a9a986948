"""Curvature products of a generated ``Curvature`` as symmetric linear operators.

A ``CurvatureOperator`` is an ``n × n`` symmetric matrix ``A`` over some parameters
``θ_1, …, θ_P`` (``n = Σ_p numel(θ_p)``), known only through products. Vectors come in two forms:

* flat: ``v = [vec(θ_1); …; vec(θ_P)]`` (row-major ``vec``), shape ``(n,)``; ``k`` vectors are
  the columns of an ``(n, k)`` matrix;
* parameter lists: ``[t_1, …, t_P]`` with ``t_p`` shaped like ``θ_p``; ``k`` vectors have a
  leading dimension, ``t_p`` of shape ``(k, *θ_p.shape)``.

Either way, ``k`` vectors cost one call of the generated product (its leading ``V`` dimension).
Dtype and device are the parameters'. Constructors take a generated ``Curvature`` ``curv`` (positional,
after ``forward_backward``) and the kind of curvature as ``curvature=`` (as the generated methods do):

| constructor | ``A`` |
|---|---|
| ``full_operator`` | ``G = Jᵀ ∇²_z L J``, ``H = ∇²L`` or the MC Fisher, over all parameters |
| ``block_product_operator`` | ``diag(C_θ1θ1, …)``, the exact diagonal blocks (``block_products``) |
| ``hbp_block_operator`` | ``diag(B_θ1, …)``, the HBP blocks (``blocks``) |
| ``kronecker_operator`` | ``diag(G ⊗ A, …)``, the KFAC family (``kronecker_factors``) |

``data=`` (an iterable of ``(x, y)`` batches) gives each of them over a whole dataset
(``hbpc.linalg.dataset``); ``operator.inverse(λ)`` and the block-diagonal operators' exact inverses,
``logdet`` and ``trace`` are in ``hbpc.linalg.inverse``.

``params`` (a name or a list of names, default all in ``model.named_parameters()`` order) picks the
parameters and their order. For ``full_operator`` a subset gives the principal submatrix ``A_SS``;
for the block-diagonal operators, one name gives that block alone. Products and full products read
the cache of the latest ``forward_backward``; ``hbp_block_operator`` keeps the blocks of the batch
it was built on.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from hbpc.linalg.sampling import Seed, as_generator

Product = Callable[[dict[str, Tensor]], dict[str, Tensor]]
Vectors = Tensor | Sequence[Tensor]

FULL_PRODUCTS = {
    "ggn": "ggn_vector_product",
    "hessian": "hessian_vector_product",
    "fisher-mc": "fisher_mc_vector_product",
}


class CurvatureOperator:
    """Symmetric ``A`` of shape ``(n, n)`` from ``product: {name: (k, *θ)} -> {name: (k, *θ)}``.

    ``names`` and ``shapes`` fix the flat layout; ``A @ v`` takes ``(n,)`` or ``(n, k)``.
    """

    def __init__(self, product: Product, shapes: dict[str, torch.Size], dtype: torch.dtype, device: torch.device):
        self.product = product
        self.shapes = {name: torch.Size(shape) for name, shape in shapes.items()}
        self.names = list(self.shapes)
        self.sizes = [math.prod(shape) for shape in self.shapes.values()]
        self.shape = (sum(self.sizes), sum(self.sizes))
        self.dtype, self.device = dtype, device

    def __repr__(self) -> str:
        return f"CurvatureOperator(shape={self.shape}, params={self.names}, dtype={self.dtype})"

    def split(self, V: Tensor) -> dict[str, Tensor]:
        """Columns to parameters: ``(n, k) -> {name: (k, *θ)}``."""
        if V.dim() != 2 or V.shape[0] != self.shape[0]:
            raise ValueError(f"expected a matrix of shape ({self.shape[0]}, k), got {tuple(V.shape)}")
        pieces = torch.split(V.T.contiguous(), self.sizes, dim=1)  # rows of V.T: each vector's entries contiguous
        return {name: piece.reshape(-1, *shape) for (name, shape), piece in zip(self.shapes.items(), pieces)}

    def join(self, vs: dict[str, Tensor]) -> Tensor:
        """Parameters to columns: ``{name: (k, *θ)} -> (n, k)``."""
        return torch.cat([vs[name].reshape(vs[name].shape[0], -1) for name in self.names], dim=1).T

    def flatten(self, vs: Sequence[Tensor]) -> Tensor:
        """A list shaped like the parameters -> ``(n,)``."""
        return self.join({name: v.unsqueeze(0) for name, v in zip(self.names, self.checked(vs))})[:, 0]

    def unflatten(self, v: Tensor) -> list[Tensor]:
        """``(n,) -> `` a list shaped like the parameters."""
        return [t.squeeze(0) for t in self.split(v.unsqueeze(1)).values()]

    def checked(self, vs: Sequence[Tensor]) -> list[Tensor]:
        """``vs`` as a list, after checking it has one tensor per parameter."""
        vs = list(vs)
        if len(vs) != len(self.names):
            raise ValueError(f"expected {len(self.names)} tensors (one per parameter {self.names}), got {len(vs)}")
        return vs

    @torch.no_grad()
    def matmat(self, V: Vectors) -> Vectors:
        """``A V`` for ``(n, k) -> (n, k)``, or a list of ``(k, *θ) ->`` a list of ``(k, *θ)``; one product call."""
        if isinstance(V, Tensor):
            return self.join(self.product(self.split(V)))
        out = self.product(dict(zip(self.names, self.checked(V))))
        return [out[name] for name in self.names]

    def matvec(self, v: Vectors) -> Vectors:
        """``A v`` for ``(n,) -> (n,)``, or a list shaped like the parameters -> the same."""
        if isinstance(v, Tensor):
            return self.matmat(v.unsqueeze(1)).squeeze(1)
        return [t.squeeze(0) for t in self.matmat([t.unsqueeze(0) for t in self.checked(v)])]

    def __matmul__(self, v: Tensor) -> Tensor:
        """``A v`` for ``v`` of shape ``(n,)`` or ``(n, k)``."""
        return self.matvec(v) if v.dim() == 1 else self.matmat(v)

    def to_dense(self) -> Tensor:
        """The ``(n, n)`` matrix, from one product with ``k = n`` (small operators only)."""
        return self.matmat(torch.eye(self.shape[0], dtype=self.dtype, device=self.device))

    def inverse(self, damping: float = 0.0, preconditioner=None, tol: float = 1e-8, atol: float = 0.0,
                maxiter: int | None = None) -> "CurvatureOperator":
        """``(A + λ I)⁻¹`` as an operator, each product by preconditioned CG (``hbpc.linalg.inverse.cg_inverse``)."""
        from hbpc.linalg.inverse import cg_inverse

        return cg_inverse(self, damping, preconditioner, tol, atol, maxiter)


def parameter_shapes(curvature, params: str | Sequence[str] | None) -> dict[str, torch.Size]:
    """``{name: θ.shape}`` for ``params`` (a name, names, or ``None`` for all, in model order)."""
    shapes = {name: p.shape for name, p in curvature.model.named_parameters()}
    names = list(shapes) if params is None else [params] if isinstance(params, str) else list(params)
    unknown = [name for name in names if name not in shapes]
    if unknown:
        raise ValueError(f"unknown parameters {unknown}; the curvature's model has {list(shapes)}")
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"params must name distinct parameters, at least one, got {names}")
    return {name: shapes[name] for name in names}


def operator_for(curvature, product: Product, params) -> CurvatureOperator:
    """A ``CurvatureOperator`` over ``params`` with the dtype and device of the model's parameters."""
    like = next(curvature.model.parameters())
    return CurvatureOperator(product, parameter_shapes(curvature, params), like.dtype, like.device)


def check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{what}={value!r} is not one of {', '.join(map(repr, choices))}")


def full_operator(
    curv,
    /,
    curvature: str = "ggn",
    params=None,
    samples: int = 1,
    generator: Seed = None,
    data=None,
    reduction: str | None = None,
    progress: bool | None = None,
) -> CurvatureOperator:
    """``G = Jᵀ ∇²_z L J`` (``"ggn"``), ``H = ∇²L`` (``"hessian"``) or ``F = Jᵀ (1/S Σ_s s sᵀ) J`` (``"fisher-mc"``).

    ``"fisher-mc"`` (cross-entropy only) draws ``samples`` labels per sample from ``generator`` on
    every product call: the ``k`` columns of one ``matmat`` share the draw, separate calls do not.
    For a subset ``S`` of parameters the operator is ``A_SS`` (zeros for the others' entries of ``v``).
    ``data`` (an iterable of ``(x, y)`` batches): the curvature of the loss over all of it, one pass per
    product (``hbpc.linalg.dataset``); without it, the batch of the latest ``forward_backward``.
    """
    check_choice("curvature", curvature, tuple(FULL_PRODUCTS))
    method = getattr(curv, FULL_PRODUCTS[curvature])
    if curvature == "fisher-mc":
        device = next(curv.model.parameters()).device
        method = functools.partial(method, samples=samples, generator=as_generator(generator, device))
    if data is not None:
        from hbpc.linalg.dataset import DataPass, full_product

        method = full_product(DataPass(curv, data, reduction, progress, f"hbpc {curvature} product"), method)
    every = {name: p for name, p in curv.model.named_parameters()}

    def product(vs: dict[str, Tensor]) -> dict[str, Tensor]:
        k = next(iter(vs.values())).shape[0]
        padded = [vs[name] if name in vs else p.new_zeros(k, *p.shape) for name, p in every.items()]
        return dict(zip(every, method(padded)))

    return operator_for(curv, product, params)


def block_product_operator(
    curv, /, curvature: str = "ggn", params=None, data=None, reduction: str | None = None,
    progress: bool | None = None,
) -> CurvatureOperator:
    """``diag(C_θθ)`` over ``params``: the exact diagonal blocks ``curv.block_products(curvature)``.

    ``data``: the blocks of the loss over all of it, one pass per product.
    """
    shapes = parameter_shapes(curv, params)
    if data is not None:
        from hbpc.linalg.dataset import DataPass, block_products

        data_pass = DataPass(curv, data, reduction, progress, f"hbpc {curvature} block product")
        return operator_for(curv, block_products(data_pass, curvature, list(shapes)), params)
    products = curv.block_products(curvature)
    return operator_for(curv, lambda vs: {name: products[name](v) for name, v in vs.items()}, params)


def hbp_block_operator(
    curv,
    /,
    curvature: str = "ggn",
    average_input_jacobian: bool = True,
    average_parameter_jacobian: bool = True,
    params=None,
    data=None,
    reduction: str | None = None,
    progress: bool | None = None,
) -> "BlockDiagonalOperator":
    """``diag(B_θ)`` over ``params``: the HBP blocks ``curv.blocks(...)``, formed once here.

    ``data``: the dataset-level blocks ``Σ_b w_b B_b`` (``hbpc.linalg.dataset.blocks``), one pass.
    """
    if data is not None:
        from hbpc.linalg.dataset import blocks as dataset_blocks

        blocks = dataset_blocks(curv, data, curvature, average_input_jacobian, average_parameter_jacobian,
                                reduction, progress)
    else:
        blocks = curv.blocks(curvature, average_input_jacobian, average_parameter_jacobian)
    return block_diagonal(curv, blocks, params)


def kronecker_operator(
    curv, /, kind: str = "kflr", params=None, samples: int = 1, generator: Seed = None, data=None,
    reduction: str | None = None, progress: bool | None = None, kfac_approx: str = "expand",
) -> "BlockDiagonalOperator":
    """``diag(G ⊗ A, G, …)`` over ``params`` (default: ``curv.factored_parameters``): the KFAC family's
    blocks ``curv.kronecker_factors(kind)``; ``data``: the dataset-level factors, one pass; ``kfac_approx``: layers
    shared over positions (``"expand"`` or ``"reduce"``)."""
    device = next(curv.model.parameters()).device
    generator = as_generator(generator, device)
    if data is not None:
        from hbpc.linalg.dataset import kronecker_factors

        blocks = kronecker_factors(curv, data, kind, samples, generator, reduction, progress, kfac_approx)
    else:
        blocks = curv.kronecker_factors(kind, samples, generator, kfac_approx)
    return block_diagonal(curv, blocks, list(blocks) if params is None else params)


def block_diagonal(curv, blocks: dict, params) -> "BlockDiagonalOperator":
    """A ``BlockDiagonalOperator`` over ``params`` from ``{name: Block}``."""
    from hbpc.linalg.inverse import BlockDiagonalOperator

    shapes = parameter_shapes(curv, params)
    missing = [name for name in shapes if name not in blocks]
    if missing:
        raise ValueError(f"no blocks for parameters {missing}; there are blocks for {list(blocks)}")
    like = next(curv.model.parameters())
    return BlockDiagonalOperator({name: blocks[name] for name in shapes}, like.dtype, like.device)


def to_scipy(operator: CurvatureOperator):
    """``operator`` as a ``scipy.sparse.linalg.LinearOperator`` on float64 numpy arrays.

    ``matmat`` of an ``(n, k)`` array is one product call; ``rmatvec = matvec`` (``A`` is symmetric).
    """
    from scipy.sparse.linalg import LinearOperator

    n = operator.shape[0]

    def matmat(X: np.ndarray) -> np.ndarray:
        V = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64).reshape(n, -1))
        return operator.matmat(V.to(dtype=operator.dtype, device=operator.device)).to("cpu", torch.float64).numpy()

    def matvec(x: np.ndarray) -> np.ndarray:
        return matmat(x).reshape(-1)

    return LinearOperator(
        operator.shape, matvec=matvec, rmatvec=matvec, matmat=matmat, rmatmat=matmat, dtype=np.float64
    )
