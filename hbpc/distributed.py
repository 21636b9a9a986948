"""Data-parallel curvature with ``torch.distributed``: every rank holds the curvature of all ranks' data.

With a process group initialized (gloo on CPU, NCCL on GPU), each rank ``r`` holds a shard with
``N_r`` samples and its own ``Curvature``. The loss of all the data is ``L = Σ_r w_r L_r`` with
``w_r = N_r / N`` (``N = Σ_r N_r``) for a mean reduction and ``w_r = 1`` for a sum, so every product,
factor and block is ``Σ_r w_r Q_r``: each rank scales its local ``Q_r`` by ``N_r`` (mean) or 1 (sum),
one ``all_reduce(SUM)`` adds them up, and a mean divides by ``N``. All ranks then hold the same
tensor, equal to one process over all the data (up to the order of float additions). Every rank must
take part in every dataset-level call with at least one batch (the all-reduce waits for all ranks).

Two entry points:

* the dataset-level functions of ``hbpc.linalg`` (``data=``) all-reduce their results by
  themselves whenever a process group is initialized (each rank passes its shard's loader);
* ``DistributedCurvature(curvature)`` wraps one rank's ``Curvature`` for training under
  ``DistributedDataParallel``: ``forward_backward`` caches the local batch (leaving ``p.grad``, which DDP
  filled, alone) and every product, block and Kronecker factor it hands out is all-reduced, so
  ``NewtonCG`` and ``KFAC`` work unchanged::

      torchrun --nproc_per_node=2 train.py        # train.py: dist.init_process_group("gloo")

      ddp = DistributedDataParallel(model)
      curv = DistributedCurvature(curv_model.Curvature(model))
      opt = NewtonCG(model.parameters(), curv, source="full", curvature="ggn")
      for x, y in shard:                          # the rank's shard, equal batch sizes on all ranks
          opt.zero_grad()
          loss_fn(ddp(x), y).backward()           # DDP all-reduces (averages) the gradients
          curv.forward_backward(x, y)             # local cache; p.grad left as DDP made it
          opt.step()                              # products all-reduced by hbpc

DDP averages gradients uniformly over ranks, which is the gradient of the global mean loss when all
ranks' batches have the same size; hbpc weights curvature by ``N_r / N``, exact for any sizes.
"""

from __future__ import annotations

import re
import sys
from typing import Callable, Sequence

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum")
_DOC_REDUCTION = re.compile(r"Curvature of \S+ \((mean|sum)\)")


def initialized() -> bool:
    """Whether a ``torch.distributed`` process group is initialized (and has more than one rank)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensors: Sequence[Tensor]) -> list[Tensor]:
    """``Σ_r t_r`` for every tensor (one ``all_reduce`` on a flat buffer); the tensors themselves without a group."""
    tensors = list(tensors)
    if not initialized() or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    pieces = torch.split(flat, [t.numel() for t in tensors])
    return [piece.reshape(t.shape) for piece, t in zip(pieces, tensors)]


def all_reduce_count(n: int | float, like: Tensor) -> float:
    """``Σ_r n_r`` (a sample count or loss) over all ranks, as a Python number."""
    if not initialized():
        return n
    total = torch.tensor([float(n)], dtype=torch.float64, device=like.device)
    torch.distributed.all_reduce(total)
    return total.item()


def loss_reduction(curvature, reduction: str | None = None) -> str:
    """The loss reduction, ``"mean"`` or ``"sum"``: ``reduction`` if given, else read off the generated class.

    The generated ``Curvature`` says it in its docstring (``Curvature of cross_entropy (mean) ...``).
    """
    if reduction is not None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction={reduction!r} is not one of 'mean', 'sum'")
        return reduction
    found = _DOC_REDUCTION.search(type(unwrap(curvature)).__doc__ or "")
    if found is None:
        raise ValueError("cannot tell the loss reduction of this Curvature from its docstring; pass reduction='mean' "
                         "or reduction='sum'")
    return found.group(1)


def unwrap(curvature):
    """The generated ``Curvature`` inside a ``DistributedCurvature`` (or ``curvature`` itself)."""
    return curvature.curvature if isinstance(curvature, DistributedCurvature) else curvature


def block_classes(curvature):
    """The generated module's ``(DenseBlock, KroneckerBlock)`` for ``curvature`` (the runtime's where the module
    imports none: its blocks are all matrix-free, e.g. Linear layers shared over positions)."""
    from hbpc.runtime import blocks

    module = sys.modules[type(unwrap(curvature)).__module__]
    return getattr(module, "DenseBlock", blocks.DenseBlock), getattr(module, "KroneckerBlock", blocks.KroneckerBlock)


class Weights:
    """``w = c / d``: a batch's weight in a sum over batches and ranks.

    ``c`` is ``N_b`` (mean reduction, or any sample-averaged quantity) or ``1`` (sum), ``d`` is the total
    sample count ``N`` (mean) or ``1`` (sum); ``d`` is known only after the pass and the all-reduce.
    """

    def __init__(self, reduction: str):
        self.mean = reduction == "mean"

    def local(self, batch_size: int) -> float:
        """``c`` for a batch of ``batch_size`` samples."""
        return float(batch_size) if self.mean else 1.0

    def total(self, count: float) -> float:
        """``d`` from the all-reduced sample count."""
        return count if self.mean else 1.0


class DistributedCurvature:
    """One rank's ``Curvature`` whose products, blocks and factors are the all-reduced ones of all ranks' batches.

    ``gradients="ddp"`` (default): ``forward_backward`` leaves ``p.grad`` untouched (DDP fills it);
    ``gradients="reduce"``: it sets ``p.grad`` to the gradient of the global loss ``Σ_r w_r L_r`` (no DDP needed).
    ``forward_backward`` returns the global loss. Without a process group this is the wrapped curvature.
    Blocks (``blocks``) are summed densely (``DenseBlock``), so they need ``numel²`` entries per parameter.
    """

    def __init__(self, curvature, gradients: str = "ddp", reduction: str | None = None):
        if gradients not in ("ddp", "reduce"):
            raise ValueError(f"gradients={gradients!r} is not one of 'ddp', 'reduce'")
        self.curvature, self.gradients = curvature, gradients
        self.weights = Weights(loss_reduction(curvature, reduction))
        self.local_weight, self.total = 1.0, 1.0

    def __getattr__(self, name):  # model, factored_parameters, memory_limit, ... of the wrapped curvature
        return getattr(self.curvature, name)

    @property
    def model(self) -> torch.nn.Module:
        return self.curvature.model

    def forward_backward(self, x: Tensor, target: Tensor) -> Tensor:
        """Cache the local batch; returns ``L = Σ_r w_r L_r``."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        loss = self.curvature.forward_backward(x, target)
        self.local_weight = self.weights.local(x.shape[0])
        self.total = self.weights.total(all_reduce_count(x.shape[0], loss))
        reducing = self.gradients == "reduce"
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params] if reducing else []
        reduced = self.reduce([loss.detach().reshape(1), *grads])
        if reducing:
            for p, g in zip(params, reduced[1:]):
                p.grad = g
        else:
            for p, g in zip(params, saved):
                p.grad = g
        return reduced[0].reshape(())

    def reduce(self, tensors: Sequence[Tensor], sample_mean: bool = False) -> list[Tensor]:
        """``Σ_r w_r t_r`` for every tensor; ``sample_mean``: the weights ``N_r / N`` whatever the reduction."""
        if not initialized():
            return list(tensors)
        weights = Weights("mean") if sample_mean else self.weights
        c = weights.local(self.local_size) if sample_mean else self.local_weight
        d = self.sample_count if sample_mean else self.total
        return [t / d for t in all_reduce_sum([c * t for t in tensors])]

    @property
    def local_size(self) -> int:
        return self.curvature.N

    @property
    def sample_count(self) -> float:
        return all_reduce_count(self.local_size, next(iter(self.model.parameters())))

    def reduced_product(self, product: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """``v -> Σ_r w_r (C_r v)``; keeps ``.parts`` (split products) reduced as well."""
        if not initialized():
            return product

        def apply(v: Tensor) -> Tensor:
            return self.reduce([product(v)])[0]

        parts = getattr(product, "parts", None)
        if parts is not None:
            return _Split(apply, [(start, stop, self.reduced_product(part)) for start, stop, part in parts])
        return apply

    def block_products(self, curvature: str = "ggn", split: int = 1) -> dict[str, Callable]:
        local = self.curvature.block_products(curvature, split=split) if split != 1 else \
            self.curvature.block_products(curvature)
        return {name: self.reduced_product(product) for name, product in local.items()}

    def _full(self, method: str, vs, **kwargs) -> list[Tensor]:
        return self.reduce(getattr(self.curvature, method)(vs, **kwargs))

    def ggn_vector_product(self, vs):
        return self._full("ggn_vector_product", vs)

    def hessian_vector_product(self, vs):
        return self._full("hessian_vector_product", vs)

    def fisher_mc_vector_product(self, vs, samples: int = 1, generator=None):
        return self._full("fisher_mc_vector_product", vs, samples=samples, generator=generator)

    def blocks(self, curvature: str = "ggn", average_input_jacobian: bool = True,
               average_parameter_jacobian: bool = True, split: int = 1) -> dict:
        local = self.curvature.blocks(curvature, average_input_jacobian, average_parameter_jacobian,
                                      **({"split": split} if split != 1 else {}))
        if not initialized():
            return local
        if split != 1:
            raise ValueError("DistributedCurvature.blocks sums blocks densely and has no split; use block_products")
        DenseBlock, _ = block_classes(self.curvature)
        names = list(local)
        dense = self.reduce([local[name].to_dense() for name in names])
        return {name: DenseBlock(matrix, local[name].param_shape) for name, matrix in zip(names, dense)}

    def kronecker_factors(self, kind: str = "kflr", samples: int = 1, generator=None, kfac_approx="expand") -> dict:
        """``G`` summed like the loss (``Σ_r w_r G_r``), ``A`` as a sample mean (``Σ_r (N_r/N) A_r``)."""
        local = self.curvature.kronecker_factors(kind, samples, generator, kfac_approx)
        return reduce_factors(local, self.reduce, block_classes(self.curvature)) if initialized() else local


class _Split:
    """A reduced split product: callable, with ``.parts`` like the generated ``SplitProduct``."""

    def __init__(self, product, parts):
        self.product, self.parts = product, parts

    def __call__(self, v: Tensor) -> Tensor:
        return self.product(v)


def reduce_factors(factors: dict, reduce, classes) -> dict:
    """Kronecker factors with ``G`` reduced by ``reduce(ts)`` and ``A`` by ``reduce(ts, sample_mean=True)``.

    ``factors``: ``{name: KroneckerBlock(G, A) | DenseBlock(G)}``; one reduce call per kind of factor.
    """
    DenseBlock, KroneckerBlock = classes
    names = list(factors)
    Gs = reduce([factors[n].kronecker_factors[0] if factors[n].kronecker_factors else factors[n].to_dense()
                 for n in names])
    kron = [n for n in names if factors[n].kronecker_factors is not None]
    As = dict(zip(kron, reduce([factors[n].kronecker_factors[1] for n in kron], sample_mean=True)))
    return {n: KroneckerBlock(G, As[n], factors[n].param_shape) if n in As else DenseBlock(G, factors[n].param_shape)
            for n, G in zip(names, Gs)}
