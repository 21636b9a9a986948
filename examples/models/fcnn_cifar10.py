"""Chen et al. (2018) FCNN on CIFAR-10, the model of the HBP paper's Fig. 4.

`(N, 3, 32, 32) -> Flatten -> (N, 3072)`, then Linear layers
3072-1024-512-256-128-64-32-16-10 with a Sigmoid after every layer but the last.
Weights `xavier_normal_`, biases zero: 3,846,810 parameters.
"""

import torch
from torch import nn

WIDTHS = [3072, 1024, 512, 256, 128, 64, 32, 16, 10]


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


example_input = torch.zeros(2, 3, 32, 32)
loss_fn = nn.CrossEntropyLoss()
