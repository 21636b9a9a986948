# torch.cat of two branches.
# outcome: compiles
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 2)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.sigmoid(torch.cat([self.a(x), self.b(x)], dim=1)))


torch.manual_seed(0)
model = M()
example_input = torch.randn(3, 3)
loss_fn = nn.MSELoss()
