# A frozen first layer (requires_grad=False): loss.backward() leaves its grad None.
# outcome: compiles
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
model[0].requires_grad_(False)
example_input = torch.randn(2, 3)
