# torch.stack of two branches.
# expect: unsupported op 'stack'
# expect: {here}
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 2)

    def forward(self, x):
        return torch.stack([self.a(x), self.b(x)], dim=1).flatten(1)  # here


model = M()
example_input = torch.zeros(2, 3)
loss_fn = nn.MSELoss()
