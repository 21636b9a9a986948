# Parameter names that look like code: quotes, brackets, unicode, generated-code names.
# outcome: compiles-or-clean-error
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential()
model.add_module("x']); __import__('os')('echo pwned'); (['", nn.Linear(3, 3))
model.add_module("self", nn.Tanh())
model.add_module("θ ünï 🙂", nn.Linear(3, 3))
model.add_module("torch", nn.Sigmoid())
model.add_module("{x} %s", nn.Linear(3, 3))
model.add_module("PARAMETERS", nn.ReLU())
model.add_module("1 + 1", nn.Linear(3, 2))
example_input = torch.randn(2, 3)
