# The class instead of an instance.
# expect: model file defines no `model` nn.Module (found type)
# expect: model_is_a_class.py
import torch
from torch import nn

model = nn.Linear
example_input = torch.zeros(2, 3)
