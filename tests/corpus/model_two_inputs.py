# forward takes two tensors; example_input is one.
# expect: the model's forward pass failed on example_input
# expect: mask
# expect: M.forward
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x, mask):
        return self.fc(x * mask)


model = M()
example_input = torch.zeros(2, 3)
