# forward returns a tuple; the loss needs one tensor.
# expect: the model must return a single tensor
# expect: M.forward
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        y = self.fc(x)
        return y, torch.sigmoid(y)


model = M()
example_input = torch.zeros(2, 3)
