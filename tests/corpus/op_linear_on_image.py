# nn.Linear on a (N, C, H, W) tensor acts on the last dimension only: one weight shared by the C·H positions.
# outcome: compiles
import torch
from torch import nn

model = nn.Sequential(nn.Linear(3, 2), nn.Sigmoid(), nn.Flatten(), nn.Linear(8, 2))
example_input = torch.linspace(-1, 1, 24).reshape(2, 1, 4, 3)
