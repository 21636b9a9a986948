"""c4d3 with ReLUs for Fashion-MNIST: ``examples/models/c4d3_fashion_mnist.py`` with every sigmoid a ReLU.

The time-to-target benchmark's ordinary CNN (``bench/time_to_target.py``), where first-order methods
do not stall:

    (N, 1, 28, 28) -> Conv(1→16, 3×3, pad 1), ReLU, Conv(16→16, 3×3, pad 1), ReLU, MaxPool(2, 2)
    -> (N, 16, 14, 14) -> Conv(16→32, 3×3, pad 1), ReLU, Conv(32→32, 3×3, pad 1), ReLU, MaxPool(2, 2)
    -> (N, 32, 7, 7) -> Flatten (1568) -> Linear 512, ReLU, Linear 64, ReLU, Linear 10 -> (N, 10)

Default PyTorch initialization: 853,178 parameters.
"""

import torch
from torch import nn


def build_model() -> nn.Sequential:
    """ReLU c4d3 for 1×28×28 inputs with seeded default initialization."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2, stride=2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2, stride=2),
        nn.Flatten(),
        nn.Linear(1568, 512),
        nn.ReLU(),
        nn.Linear(512, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


example_input = torch.zeros(2, 1, 28, 28)
loss_fn = nn.CrossEntropyLoss()
