# x.relu_() has no rule of its own (nn.ReLU(inplace=True) and F.relu(x, inplace=True) compile).
# expect: unsupported op 'relu_'
# expect: node `relu_`
# expect: {here}
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.fc(x).relu_())  # here


model = M()
example_input = torch.randn(2, 3)
