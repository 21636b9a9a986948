"""Random probe vectors with reproducible generators.

``generator`` everywhere in ``hbpc.linalg`` is a ``torch.Generator``, an ``int`` seed (a fresh
generator on the operator's device, seeded with it) or ``None`` (torch's global generator).
"""

from __future__ import annotations

import torch
from torch import Tensor

Seed = torch.Generator | int | None


def as_generator(generator: Seed, device: torch.device) -> torch.Generator | None:
    """``generator`` as a ``torch.Generator`` (an ``int`` seeds a new one on ``device``) or ``None``."""
    if isinstance(generator, int):
        return torch.Generator(device).manual_seed(generator)
    return generator


def rademacher(n: int, k: int, generator: Seed, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(n, k)`` entries ``±1`` with probability ½ each."""
    g = as_generator(generator, device)
    bits = torch.randint(0, 2, (n, k), generator=g, device=device if g is None else g.device)
    return (2 * bits - 1).to(dtype=dtype, device=device)


def gaussian(n: int, k: int, generator: Seed, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(n, k)`` standard normal entries."""
    g = as_generator(generator, device)
    sample = torch.randn(n, k, generator=g, dtype=dtype, device=device if g is None else g.device)
    return sample.to(device)
