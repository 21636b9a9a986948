"""Curvature of the loss over a whole dataset: one pass of ``forward_backward`` per product, summed batch by batch.

``data`` is any iterable of ``(x, y)`` batches (a ``DataLoader``, a list) that yields the same batches
on every pass (no shuffling: checked from the batch sizes and input sums). With ``N_b`` samples in
batch ``b`` and ``N = Σ_b N_b``, the dataset loss is

    L = Σ_b w_b L_b,    w_b = N_b / N (mean reduction),    w_b = 1 (sum reduction),

which equals the loss of the concatenated data whatever the batch sizes (``L_b`` is the batch loss
with the compiled reduction). Every dataset-level quantity is ``Q = Σ_b w_b Q_b``, accumulated as a
running sum (memory constant in the number of batches):

* full and block products (``G v``, ``H v``, ``C_θθ v``) and gradients are linear in the per-sample
  terms, so ``Q`` equals the quantity of the concatenated data exactly;
* Kronecker factors: ``G = Σ_b w_b G_b`` and ``A = Σ_b (N_b / N) A_b`` (``A`` is a sample mean for
  either reduction), exactly the factors of the concatenated data for ``kflr`` and ``kfac``
  (``kfra``'s ``G`` is HBP-based: the same weighted sum of per-batch factors);
* HBP blocks are nonlinear in the batch (averaged Jacobians, ``S`` summed over the batch): the
  dataset-level block is defined as ``B = Σ_b w_b B_b``, the weighted sum of the per-batch blocks,
  so it depends on how the data is batched (at batch size 1 on a chain it is the exact block).
  It is summed densely (``DenseBlock``), ``numel²`` entries per parameter, refused above
  ``curvature.memory_limit``.

With a ``torch.distributed`` process group, each rank passes its shard and the sums run over all
ranks' batches too (``hbpc.distributed``). ``p.grad`` is restored after every pass
(``forward_backward(curvature, data)`` is the one that sets it, to the dataset gradient).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from hbpc.distributed import Weights, all_reduce_count, all_reduce_sum, block_classes, loss_reduction, unwrap

PROGRESS_MIN_BATCHES = 20  # progress=None shows a bar from this many batches on


class DataPass:
    """Runs ``curvature.forward_backward`` over ``data`` and sums per-batch quantities with the weights ``w_b``.

    ``reduction`` (``"mean"``/``"sum"``) defaults to the compiled loss's; ``progress``: ``True``/``False``
    or ``None`` (a tqdm bar for ``PROGRESS_MIN_BATCHES`` or more batches).
    """

    def __init__(self, curvature, data: Iterable, reduction: str | None = None, progress: bool | None = None,
                 description: str = "hbpc pass"):
        if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
            raise TypeError("data must be an iterable of (x, y) batches, got one (x, y) pair; wrap it: data=[(x, y)]")
        self.curvature = unwrap(curvature)
        self.data = data
        self.weights = Weights(loss_reduction(curvature, reduction))
        self.progress, self.description = progress, description
        self.fingerprint: list[tuple[int, float]] | None = None
        self.passes = 0

    @property
    def parameters(self) -> list[Tensor]:
        return [p for p in self.curvature.model.parameters()]

    def batches(self):
        """``(x, y)`` of every batch, moved to the parameters' device, with a progress bar."""
        total = len(self.data) if hasattr(self.data, "__len__") else None
        show = self.progress if self.progress is not None else (total or 0) >= PROGRESS_MIN_BATCHES
        device = self.parameters[0].device
        batches = self.data
        if show:
            from tqdm import tqdm

            batches = tqdm(self.data, total=total, desc=self.description, leave=False)
        for index, batch in enumerate(batches):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"data must yield (x, y) batches; batch {index} is a {type(batch).__name__}"
                                + (f" of length {len(batch)}" if hasattr(batch, "__len__") else ""))
            x, y = batch
            yield x.to(device), y.to(device)

    def run(self, quantities: Callable[[Tensor], Sequence[Tensor] | tuple[Sequence[Tensor], Sequence[bool]]]
            ) -> list[Tensor]:
        """``Σ_b w_b q_b`` for every tensor ``q_b`` of ``quantities(L_b)``, called after the batch's forward_backward.

        ``quantities`` may return ``(tensors, sample_mean)``: entries with ``sample_mean[i]`` are weighted
        ``N_b / N`` whatever the reduction (Kronecker ``A`` factors).
        """
        sums, flags, count, fingerprint = None, None, 0, []
        with kept_gradients(self.parameters):
            for p in self.parameters:
                p.grad = None  # forward_backward accumulates into p.grad
            for x, y in self.batches():
                values = quantities(self.curvature.forward_backward(x, y).detach())
                values, flags = values if isinstance(values, tuple) else (values, [False] * len(values))
                for p in self.parameters:
                    p.grad = None
                scaled = [q * (float(x.shape[0]) if flag else self.weights.local(x.shape[0]))
                          for q, flag in zip(values, flags)]
                sums = scaled if sums is None else [s.add_(q) for s, q in zip(sums, scaled)]
                count += x.shape[0]
                fingerprint.append((x.shape[0], float(x.detach().double().sum())))
        if sums is None:
            raise ValueError("data yielded no batches")
        self.check_fingerprint(fingerprint)
        sums = all_reduce_sum(sums)
        total = all_reduce_count(count, sums[0])
        return [s / (total if flag else self.weights.total(total)) for s, flag in zip(sums, flags)]

    def check_fingerprint(self, fingerprint: list[tuple[int, float]]) -> None:
        """Refuse data that changes between passes (a shuffling loader would make products inconsistent)."""
        self.passes += 1
        if self.fingerprint is None:
            self.fingerprint = fingerprint
            return
        for index, (old, new) in enumerate(zip(self.fingerprint, fingerprint)):
            if old[0] != new[0] or not math.isclose(old[1], new[1], rel_tol=1e-12, abs_tol=1e-12):
                raise ValueError(f"data yielded a different batch {index} on pass {self.passes} than on pass 1 "
                                 f"(sizes {old[0]}, {new[0]}; input sums {old[1]:.6g}, {new[1]:.6g}); "
                                 "dataset-level operators need the same batches every pass: turn shuffling off")
        if len(self.fingerprint) != len(fingerprint):
            raise ValueError(f"data yielded {len(fingerprint)} batches on pass {self.passes}, "
                             f"{len(self.fingerprint)} on pass 1; it must yield the same batches every pass")


@contextlib.contextmanager
def kept_gradients(params: Sequence[Tensor]):
    """Restore every ``p.grad`` (the tensor object, or ``None``) on exit."""
    saved = [p.grad for p in params]
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def forward_backward(curvature, data: Iterable, reduction: str | None = None, progress: bool | None = None) -> Tensor:
    """The dataset loss ``L = Σ_b w_b L_b``; sets ``p.grad = ∇L`` (replacing what was there)."""
    data_pass = DataPass(curvature, data, reduction, progress, "hbpc gradient")
    params = data_pass.parameters
    loss, *grads = data_pass.run(
        lambda loss: [loss.reshape(1), *[torch.zeros_like(p) if p.grad is None else p.grad for p in params]])
    for p, g in zip(params, grads):
        if p.requires_grad:
            p.grad = g
    return loss.reshape(())


def full_product(data_pass: DataPass, method: Callable) -> Callable[[list[Tensor]], list[Tensor]]:
    """``vs -> Σ_b w_b A_b vs`` for a full product ``method`` (a list shaped like all parameters, leading V)."""
    return lambda vs: data_pass.run(lambda loss: method(vs))


def block_products(data_pass: DataPass, curvature: str, names: Sequence[str]) -> Callable:
    """``{name: v} -> {name: Σ_b w_b C_b v}`` for the exact diagonal blocks of ``names``."""

    def product(vs: dict[str, Tensor]) -> dict[str, Tensor]:
        def batch(loss):
            products = data_pass.curvature.block_products(curvature)
            return [products[name](vs[name]) for name in names]

        return dict(zip(names, data_pass.run(batch)))

    return product


def blocks(curv, data: Iterable, curvature: str = "ggn", average_input_jacobian: bool = True,
           average_parameter_jacobian: bool = True, reduction: str | None = None, progress: bool | None = None) -> dict:
    """Dataset-level HBP blocks ``B = Σ_b w_b B_b`` (``DenseBlock`` per parameter), one pass over ``data``."""
    data_pass = DataPass(curv, data, reduction, progress, "hbpc blocks")
    inner = data_pass.curvature
    shapes = {name: tuple(p.shape) for name, p in inner.model.named_parameters()}
    itemsize = next(iter(inner.model.parameters())).element_size()
    needed = sum(math.prod(shape) ** 2 for shape in shapes.values()) * itemsize * 2
    if needed > inner.memory_limit:
        largest = max(shapes, key=lambda n: math.prod(shapes[n]))
        raise MemoryError(f"dataset-level blocks are summed densely and need {needed / 2**30:.2f} GiB "
                          f"(largest: {largest!r}, {math.prod(shapes[largest])}² entries), more than memory_limit "
                          f"({inner.memory_limit / 2**30:.2f} GiB); use kronecker_factors(data=...) or "
                          "block_product_operator(data=...)")
    names = list(shapes)

    def batch(loss):
        local = inner.blocks(curvature, average_input_jacobian, average_parameter_jacobian)
        return [local[name].to_dense() for name in names]

    DenseBlock, _ = block_classes(inner)
    return {name: DenseBlock(matrix, shapes[name]) for name, matrix in zip(names, data_pass.run(batch))}


def kronecker_factors(curvature, data: Iterable, kind: str = "kflr", samples: int = 1, generator=None,
                      reduction: str | None = None, progress: bool | None = None, kfac_approx: str = "expand") -> dict:
    """Dataset-level Kronecker factors: ``G = Σ_b w_b G_b``, ``A = Σ_b (N_b / N) A_b``, one pass over ``data``.

    Same keys and block types as ``curvature.kronecker_factors``: ``KroneckerBlock(G, A)`` for weights,
    ``DenseBlock(G)`` for biases. ``generator`` draws ``kfac``'s labels batch after batch. ``kfac_approx``: layers
    shared over positions, as for ``curvature.kronecker_factors``.
    """
    data_pass = DataPass(curvature, data, reduction, progress, "hbpc kronecker factors")
    inner = data_pass.curvature
    layout: list[tuple[str, bool]] = []  # (name, has factors A and G), in the generated order

    def batch(loss):
        local = inner.kronecker_factors(kind, samples, generator, kfac_approx)
        layout[:] = [(name, block.kronecker_factors is not None) for name, block in local.items()]
        values, flags = [], []
        for block in local.values():
            pair = block.kronecker_factors
            values += list(pair) if pair is not None else [block.to_dense()]
            flags += [False, True] if pair is not None else [False]
        return values, flags

    values = data_pass.run(batch)
    DenseBlock, KroneckerBlock = block_classes(inner)
    shapes = {name: tuple(p.shape) for name, p in inner.model.named_parameters()}
    factors, position = {}, 0
    for name, kron in layout:
        if kron:
            factors[name] = KroneckerBlock(values[position], values[position + 1], shapes[name])
            position += 2
        else:
            factors[name] = DenseBlock(values[position], shapes[name])
            position += 1
    return factors
