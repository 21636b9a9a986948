# nn.Linear on a (N, C, H, W) tensor acts on the last dimension only.
# expect: linear
# expect: (N, features)
# expect: self.0
import torch
from torch import nn

model = nn.Sequential(nn.Linear(3, 2), nn.Sigmoid(), nn.Flatten(), nn.Linear(8, 2))
example_input = torch.zeros(2, 1, 4, 3)
