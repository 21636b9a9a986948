# Hardswish has no rule (yet): one line in rules/elementwise.py would add it.
# expect: the model uses ops hbpc cannot compile
# expect: unsupported op 'hardswish'
# expect: node `hardswish`
# expect: {here}
# expect: supported ops: 
import torch
import torch.nn.functional as F
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return F.hardswish(self.fc(x))  # here


model = M()
example_input = torch.zeros(2, 3)
