# Data-dependent control flow cannot be traced.
# expect: torch.fx could not trace the model
# expect: no Python control flow on tensor values
# expect: {here}
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        if x.sum() > 0:  # here
            return self.fc(x)
        return self.fc(-x)


model = M()
example_input = torch.zeros(2, 3)
