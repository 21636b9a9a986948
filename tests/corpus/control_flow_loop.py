# A loop over the batch dimension cannot be traced either.
# expect: torch.fx could not trace the model
# expect: no Python control flow on tensor values
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        rows = [self.fc(x[i]) for i in range(x.shape[0])]
        return torch.stack(rows)


model = M()
example_input = torch.zeros(2, 3)
