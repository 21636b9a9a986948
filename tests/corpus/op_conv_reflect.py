# Reflection padding is not zero padding.
# expect: only numeric zero padding is supported
import torch
from torch import nn

model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(50, 2))
example_input = torch.zeros(2, 1, 5, 5)
