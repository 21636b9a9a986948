"""Multinomial logistic regression on Fashion-MNIST, the single-layer tutorial model.

`(N, 1, 28, 28) -> Flatten (784) -> Linear 10 -> (N, 10)`, cross-entropy loss.
For this model the HBP weight block is `S_z ⊗ x̄ x̄ᵀ` (or `S_z ⊗ E[x xᵀ]`), with
`S_z = Σ_n ∇²_{z_n} L`. Default PyTorch initialization: 7,850 parameters.
"""

import torch
from torch import nn


def build_model() -> nn.Sequential:
    """Flatten and one seeded Linear layer."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


example_input = torch.zeros(2, 1, 28, 28)
loss_fn = nn.CrossEntropyLoss()
