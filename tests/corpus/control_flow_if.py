# Data-dependent control flow cannot be traced.
# expect: torch.fx could not trace the model
# expect: data-dependent Python control flow
# expect: {here}
# xfail: trace errors name only `M.forward`, not the file:line of the data-dependent branch
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
