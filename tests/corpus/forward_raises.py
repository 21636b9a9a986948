# forward raises (while torch.fx traces it).
# expect: torch.fx could not trace the model: ValueError: forward is not ready
# expect: {here}
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        raise ValueError("forward is not ready")  # here


model = M()
example_input = torch.zeros(2, 3)
