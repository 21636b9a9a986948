# Dropout in training mode is random: its curvature is not a function of the parameters.
# expect: dropout in training mode
# expect: eval()
# expect: self.1
import torch
from torch import nn

model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
example_input = torch.zeros(2, 3)
