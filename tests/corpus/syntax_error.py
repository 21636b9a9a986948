# A missing closing parenthesis.
# expect: model file has a syntax error
# expect: {here}
# expect: fix the Python syntax
import torch
from torch import nn

model = nn.Sequential(nn.Linear(3, 2)  # here
example_input = torch.zeros(2, 3)
