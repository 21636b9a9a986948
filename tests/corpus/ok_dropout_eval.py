# Dropout in eval mode is the identity: it compiles.
# outcome: compiles
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Tanh(), nn.Linear(4, 2)).eval()
example_input = torch.randn(3, 3)
