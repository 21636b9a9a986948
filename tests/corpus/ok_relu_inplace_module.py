# nn.ReLU(inplace=True) is the same function as nn.ReLU(): it compiles.
# outcome: compiles
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
example_input = torch.randn(2, 3)
