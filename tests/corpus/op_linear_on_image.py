# nn.Linear on a (N, C, H, W) tensor acts on the last dimension only.
# expect: linear
# expect: (N, features)
# expect: self.0
# xfail: compiles, and the generated forward_backward then fails ("attempting to assign a gradient of size [3, 1, 4, 3] to a tensor of size [2, 3]")
import torch
from torch import nn

model = nn.Sequential(nn.Linear(3, 2), nn.Sigmoid(), nn.Flatten(), nn.Linear(8, 2))
example_input = torch.zeros(2, 1, 4, 3)
