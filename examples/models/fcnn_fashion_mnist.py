"""The HBP paper's Chen et al. FCNN adapted to Fashion-MNIST (full size, only the input changed).

`(N, 1, 28, 28) -> Flatten (784)`, then Linear layers 784-1024-512-256-128-64-32-16-10
with a Sigmoid after every layer but the last. Weights `xavier_normal_`, biases
zero, as in `fcnn_cifar10.py`: 1,503,898 parameters.
"""

import torch
from torch import nn

WIDTHS = [784, 1024, 512, 256, 128, 64, 32, 16, 10]


def build_model() -> nn.Sequential:
    """The FCNN with seeded Xavier-normal weights and zero biases."""
    torch.manual_seed(0)
    layers = [nn.Flatten()]
    for d_in, d_out in zip(WIDTHS[:-1], WIDTHS[1:]):
        linear = nn.Linear(d_in, d_out)
        nn.init.xavier_normal_(linear.weight)
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.Sigmoid()]
    return nn.Sequential(*layers[:-1])


example_input = torch.zeros(2, 1, 28, 28)
loss_fn = nn.CrossEntropyLoss()
