# The model takes 3 features, example_input has 5.
# expect: the model's forward pass failed on example_input: RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x5 and 3x4)
# expect: self.0
# expect: check example_input's shape (batch first) and dtype against the model
import torch
from torch import nn

model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
example_input = torch.zeros(2, 5)
