# One nn.Linear applied twice (tied weights): its block couples both uses.
# outcome: compiles
# blocks: inexact
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


torch.manual_seed(0)
model = M()
example_input = torch.randn(3, 3)
