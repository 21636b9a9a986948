"""Curvature on a sub-batch of the gradient batch (Martens 2010, Sec. 4.3).

``SubsampledCurvature(curvature, size)`` is a ``Curvature`` whose ``forward_backward(x, y)`` fills
``p.grad`` with the gradient of the whole batch and then caches the curvature inputs of the first
``size`` samples only (``size`` an int, or a fraction of the batch in ``(0, 1]``). Every product,
block and factor asked for afterwards is the sub-batch's, so it costs about ``size / N`` of the
whole batch's. Two passes: the whole batch, then the sub-batch (whose gradient is discarded).

The batch is assumed shuffled, and the loss mean-reduced: the sub-batch mean then estimates the
batch mean's curvature. With a sum-reduced loss the curvature is ``size / N`` times too small.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class SubsampledCurvature:
    """Wraps a generated ``Curvature``; everything but ``forward_backward`` is the wrapped one's."""

    def __init__(self, curvature, size: int | float):
        if isinstance(size, bool) or not isinstance(size, (int, float)):
            raise TypeError(f"size must be an int or a float fraction, got {type(size).__name__}")
        if (isinstance(size, int) and size < 1) or (isinstance(size, float) and not 0.0 < size <= 1.0):
            raise ValueError(f"size={size!r} must be an int >= 1 or a fraction in (0, 1]")
        self.curvature, self.size = curvature, size

    def __getattr__(self, name: str):
        return getattr(self.curvature, name)

    def samples(self, batch: int) -> int:
        """How many of ``batch`` samples carry the curvature."""
        count = self.size if isinstance(self.size, int) else math.ceil(self.size * batch)
        return min(batch, count)

    def forward_backward(self, x: Tensor, target: Tensor) -> Tensor:
        """The whole batch's loss and gradient (in ``p.grad``); curvature cached on ``x[:m]``, ``target[:m]``."""
        loss = self.curvature.forward_backward(x, target)
        m = self.samples(x.shape[0])
        if m == x.shape[0]:
            return loss
        params = list(self.curvature.model.parameters())
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            self.curvature.forward_backward(x[:m], target[:m])
        finally:
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.grad = g
        return loss
