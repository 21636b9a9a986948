"""DeepOBS 3c3d with all ReLUs replaced by sigmoids (HBP paper, Fig. S6, exp09) for Fashion-MNIST's 1×28×28 inputs.

TensorFlow's "same" padding is realised by ZeroPad2d layers, as in ``deepobs_3c3d_cifar10.py``; the pads
follow TF's rule for this input size (total ``max((⌈n/s⌉ - 1)·s + k - n, 0)``, the odd pixel at the
bottom/right). Zero padding before a max-pool equals TF's ignoring of the pad because sigmoids are
positive. Only two pads differ from CIFAR-10: the input has 1 channel, and the last pool pads its 5×5
input on all sides.

    (N, 1, 28, 28) -> Conv(1→64, 5×5) -> (N, 64, 24, 24), σ, pad (0,1,0,1), MaxPool(3, 2) -> (N, 64, 12, 12)
    -> Conv(64→96, 3×3) -> (N, 96, 10, 10), σ, pad (0,1,0,1), MaxPool(3, 2)               -> (N, 96, 5, 5)
    -> pad (1,1,1,1), Conv(96→128, 3×3) -> (N, 128, 5, 5), σ, pad (1,1,1,1), MaxPool(3, 2) -> (N, 128, 3, 3)
    -> Flatten (1152) -> Linear 512, σ, Linear 256, σ, Linear 10                           -> (N, 10)

Xavier-normal conv weights, Xavier-uniform linear weights, zero biases: 892,010 parameters.
"""

import torch
from torch import nn


def build_model() -> nn.Sequential:
    """3c3d for 1×28×28 inputs with seeded DeepOBS initialization."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 64, 5),
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
        nn.ZeroPad2d((1, 1, 1, 1)),
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


example_input = torch.zeros(2, 1, 28, 28)
loss_fn = nn.CrossEntropyLoss()
