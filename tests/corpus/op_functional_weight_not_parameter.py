# F.linear with a buffer as weight: a constant, not a parameter.
# expect: the weight must be a parameter of the model
# expect: {here}
import torch
import torch.nn.functional as F
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.randn(2, 3))

    def forward(self, x):
        return F.linear(x, self.weight)  # here


model = M()
example_input = torch.zeros(2, 3)
