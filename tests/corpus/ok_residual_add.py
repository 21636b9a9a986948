# A residual connection x + f(x): a graph, not a chain.
# outcome: compiles
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        x = torch.tanh(self.fc(x)) + x
        return self.out(x)


torch.manual_seed(0)
model = M()
example_input = torch.randn(3, 3)
