# torch.tanh_(y) mutates y and discards the result: the traced graph is not a chain.
# expect: unsupported op 'tanh_'
# expect: {here}
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        y = self.fc(x)
        torch.tanh_(y)  # here
        return self.out(y)


model = M()
example_input = torch.randn(2, 3)
