# String padding is not supported.
# expect: only numeric zero padding is supported
# expect: torch.nn.modules.conv.Conv2d (self.0)
import torch
from torch import nn

model = nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten(), nn.Linear(50, 2))
example_input = torch.zeros(2, 1, 5, 5)
