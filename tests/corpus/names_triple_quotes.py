# A parameter name that closes a docstring.
# outcome: compiles-or-clean-error
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential()
model.add_module('"""', nn.Linear(3, 3))
model.add_module("act", nn.Sigmoid())
model.add_module('"""2', nn.Linear(3, 2))
example_input = torch.randn(2, 3)
