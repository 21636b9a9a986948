"""A small sigmoid MLP for Fashion-MNIST.

`(N, 1, 28, 28) -> Flatten (784) -> Linear 128, σ, Linear 64, σ, Linear 10 -> (N, 10)`.
Default PyTorch initialization: 109,386 parameters.
"""

import torch
from torch import nn


def build_model() -> nn.Sequential:
    """The MLP with seeded default initialization."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 128),
        nn.Sigmoid(),
        nn.Linear(128, 64),
        nn.Sigmoid(),
        nn.Linear(64, 10),
    )


example_input = torch.zeros(2, 1, 28, 28)
loss_fn = nn.CrossEntropyLoss()
