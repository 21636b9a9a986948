# Nothing to compute curvature for: compiling to a module with no blocks is fine, and so is a clean error.
# outcome: compiles-or-clean-error
import torch
from torch import nn

model = nn.Sequential(nn.Flatten(), nn.ReLU())
example_input = torch.zeros(2, 3)
loss_fn = nn.MSELoss()
