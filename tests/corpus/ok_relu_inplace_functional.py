# F.relu(x, inplace=True) on an intermediate result is the same function as F.relu(x): it compiles.
# outcome: compiles
import torch
import torch.nn.functional as F
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(F.relu(self.fc(x), inplace=True))


torch.manual_seed(0)
model = M()
example_input = torch.randn(2, 3)
loss_fn = nn.MSELoss(reduction="sum")
