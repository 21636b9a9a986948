# Integer example_input for a float model.
# expect: the model's forward pass failed on example_input: RuntimeError: mat1 and mat2 must have the same dtype, but got Long and Float
# expect: check example_input's shape (batch first) and dtype against the model
import torch
from torch import nn

model = nn.Linear(3, 2)
example_input = torch.zeros(2, 3, dtype=torch.long)
