# A submodule name with a backslash breaks torch.fx's generated forward.
# outcome: compiles-or-clean-error
import torch
from torch import nn

model = nn.Sequential()
model.add_module("a\\", nn.Linear(3, 3))
model.add_module("b", nn.Linear(3, 2))
example_input = torch.randn(2, 3)
