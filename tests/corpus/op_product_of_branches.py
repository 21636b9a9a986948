# The product of two branches (a gating unit).
# expect: unsupported op 'mul'
# expect: {here}
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.a(x) * torch.sigmoid(self.b(x)))  # here


model = M()
example_input = torch.zeros(2, 3)
