# An empty nn.Sequential returns its input.
# expect: the model has no ops
# expect: compile a model with at least one layer
import torch
from torch import nn

model = nn.Sequential()
example_input = torch.zeros(2, 3)
