"""c4d3 on CIFAR-10 with sigmoids, the model of the HBP paper's Fig. 5 (exp08).

    (N, 3, 32, 32) -> Conv(3→16, 3×3, pad 1), σ, Conv(16→16, 3×3, pad 1), σ, MaxPool(2, 2)
    -> (N, 16, 16, 16) -> Conv(16→32, 3×3, pad 1), σ, Conv(32→32, 3×3, pad 1), σ, MaxPool(2, 2)
    -> (N, 32, 8, 8) -> Flatten (2048) -> Linear 512, σ, Linear 64, σ, Linear 10 -> (N, 10)

Default PyTorch initialization: 1,099,226 parameters.
"""

import torch
from torch import nn


def build_model() -> nn.Sequential:
    """c4d3 with seeded default initialization."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.Sigmoid(),
        nn.MaxPool2d(2, stride=2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.Sigmoid(),
        nn.MaxPool2d(2, stride=2),
        nn.Flatten(),
        nn.Linear(2048, 512),
        nn.Sigmoid(),
        nn.Linear(512, 64),
        nn.Sigmoid(),
        nn.Linear(64, 10),
    )


example_input = torch.zeros(2, 3, 32, 32)
loss_fn = nn.CrossEntropyLoss()
