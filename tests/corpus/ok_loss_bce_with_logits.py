# BCEWithLogitsLoss on one logit.
# outcome: compiles
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
example_input = torch.randn(3, 3)
loss_fn = nn.BCEWithLogitsLoss()
