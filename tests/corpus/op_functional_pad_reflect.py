# F.pad in reflect mode.
# expect: only zero padding (mode='constant', value=0) is supported
# expect: {here}
import torch
import torch.nn.functional as F
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)
        self.fc = nn.Linear(25, 2)

    def forward(self, x):
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")  # here
        return self.fc(torch.flatten(self.conv(x), 1))


model = M()
example_input = torch.zeros(2, 1, 5, 5)
