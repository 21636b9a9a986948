# A submodule named like a Python keyword: torch.fx's generated forward is not valid Python.
# outcome: compiles-or-clean-error
import torch
from torch import nn

model = nn.Sequential()
model.add_module("None", nn.Linear(3, 3))
model.add_module("class", nn.Linear(3, 2))
example_input = torch.randn(2, 3)
