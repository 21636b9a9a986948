# An IndentationError is a SyntaxError too.
# expect: model file has a syntax error
# expect: {here}
import torch
from torch import nn


def build_model():
return nn.Linear(3, 2)  # here


example_input = torch.zeros(2, 3)
