# A submodule that forward never calls: its parameters get no gradient, like with loss.backward().
# outcome: compiles
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.sigmoid(x))


torch.manual_seed(0)
model = M()
example_input = torch.randn(2, 3)
