# Neither `model` nor `build_model()`.
# expect: model file defines no `model` nn.Module (found nothing)
# expect: no_model.py
# expect: define `model = ...` (an nn.Module) or `def build_model(): return ...`
import torch
from torch import nn

net = nn.Linear(3, 2)
example_input = torch.zeros(2, 3)
