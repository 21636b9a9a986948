"""c4d3 with sigmoids (the HBP paper's Fig. 5 model, exp08) adapted to Fashion-MNIST's 1×28×28 inputs.

Only the input channels (3 → 1) and, through the smaller image, the first Linear layer's input
(2048 → 1568) differ from ``c4d3_cifar10.py``:

    (N, 1, 28, 28) -> Conv(1→16, 3×3, pad 1), σ, Conv(16→16, 3×3, pad 1), σ, MaxPool(2, 2)
    -> (N, 16, 14, 14) -> Conv(16→32, 3×3, pad 1), σ, Conv(32→32, 3×3, pad 1), σ, MaxPool(2, 2)
    -> (N, 32, 7, 7) -> Flatten (1568) -> Linear 512, σ, Linear 64, σ, Linear 10 -> (N, 10)

Default PyTorch initialization: 853,178 parameters.
"""

import torch
from torch import nn


def build_model() -> nn.Sequential:
    """c4d3 for 1×28×28 inputs with seeded default initialization."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
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
        nn.Linear(1568, 512),
        nn.Sigmoid(),
        nn.Linear(512, 64),
        nn.Sigmoid(),
        nn.Linear(64, 10),
    )


example_input = torch.zeros(2, 1, 28, 28)
loss_fn = nn.CrossEntropyLoss()
