# ceil_mode changes the output size and the windows at the border (torch's forward records them).
# outcome: compiles
import torch
from torch import nn

model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(8, 2))
example_input = torch.zeros(2, 1, 4, 4)
