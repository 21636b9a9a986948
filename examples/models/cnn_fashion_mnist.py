"""A small sigmoid CNN for Fashion-MNIST.

    (N, 1, 28, 28) -> Conv(1→8, 5×5), σ, MaxPool(2) -> (N, 8, 12, 12)
    -> Conv(8→16, 5×5), σ, MaxPool(2)              -> (N, 16, 4, 4)
    -> Flatten (256) -> Linear 10                  -> (N, 10)

Default PyTorch initialization: 5,994 parameters.
"""

import torch
from torch import nn


def build_model() -> nn.Sequential:
    """The CNN with seeded default initialization."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 5),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 10),
    )


example_input = torch.zeros(2, 1, 28, 28)
loss_fn = nn.CrossEntropyLoss()
