"""Shuffled minibatches without ``torch.utils.data``."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor


def minibatches(
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of ``(images[idx], labels[idx])`` batches of ``batch_size`` samples.

    The order is ``torch.randperm(N, generator=generator)`` when ``shuffle``, else
    ``0..N-1``; the last, smaller batch is dropped when ``drop_last``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    n = len(labels)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size].to(labels.device)
        yield images[idx], labels[idx]
