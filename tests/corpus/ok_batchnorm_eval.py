# Eval-mode BatchNorm is a per-channel affine map of its input.
# outcome: compiles
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 2))
model[1].running_mean.uniform_(-1, 1)
model[1].running_var.uniform_(0.5, 2)
model[1].weight.data.uniform_(0.5, 2)
model[1].bias.data.uniform_(-1, 1)
model.eval()
example_input = torch.randn(3, 1, 4, 4)
