# Every unsupported op is reported at once.
# expect: unsupported op 'hardswish'
# expect: unsupported op 'prelu'
# expect: unsupported op 'exp'
# expect: {here}
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.norm = nn.Hardswish()
        self.act = nn.PReLU()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        x = self.act(self.norm(self.fc(x)))
        return self.out(x.exp())  # here


model = M()
example_input = torch.zeros(2, 3)
