# Global average pooling by x.mean(...): a mean over each axis.
# outcome: compiles
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


model = M()
example_input = torch.zeros(2, 1, 5, 5)
