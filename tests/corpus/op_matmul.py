# A bare matmul with a parameter (use nn.Linear instead).
# expect: 'matmul' is supported as a product of two activations
# expect: {here}
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 2))

    def forward(self, x):
        return x @ self.weight  # here


model = M()
example_input = torch.zeros(2, 3)
