# SmoothL1Loss with beta=0 is L1: no curvature at all (and a kink).
# expect: loss_fn
# outcome: compiles-or-clean-error
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 2))
example_input = torch.randn(3, 3)
loss_fn = nn.SmoothL1Loss(beta=0.0)
