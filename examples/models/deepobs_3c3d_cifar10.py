"""DeepOBS 3c3d on CIFAR-10 with all ReLUs replaced by sigmoids (HBP paper, Fig. S6, exp09).

TensorFlow's "same" padding is realised by ZeroPad2d layers:

    (N, 3, 32, 32) -> Conv(3→64, 5×5), σ, pad (0,1,0,1), MaxPool(3, 2) -> (N, 64, 14, 14)
    -> Conv(64→96, 3×3), σ, pad (0,1,0,1), MaxPool(3, 2)                -> (N, 96, 6, 6)
    -> pad (1,1,1,1), Conv(96→128, 3×3), σ, pad (0,1,0,1), MaxPool(3, 2) -> (N, 128, 3, 3)
    -> Flatten (1152) -> Linear 512, σ, Linear 256, σ, Linear 10        -> (N, 10)

Xavier-normal conv weights, Xavier-uniform linear weights, zero biases: 895,210 parameters.
"""

import torch
from torch import nn


def build_model() -> nn.Sequential:
    """3c3d with seeded DeepOBS initialization."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 5),
        nn.Sigmoid(),
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.MaxPool2d(3, stride=2),
        nn.Conv2d(64, 96, 3),
        nn.Sigmoid(),
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.MaxPool2d(3, stride=2),
        nn.ZeroPad2d((1, 1, 1, 1)),
        nn.Conv2d(96, 128, 3),
        nn.Sigmoid(),
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.MaxPool2d(3, stride=2),
        nn.Flatten(),
        nn.Linear(1152, 512),
        nn.Sigmoid(),
        nn.Linear(512, 256),
        nn.Sigmoid(),
        nn.Linear(256, 10),
    )
    for module in model:
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_normal_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return model


example_input = torch.zeros(2, 3, 32, 32)
loss_fn = nn.CrossEntropyLoss()
