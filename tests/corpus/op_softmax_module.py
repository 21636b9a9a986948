# nn.Softmax as a layer (the loss already contains the softmax).
# expect: unsupported op 'softmax'
# expect: torch.nn.modules.activation.Softmax (self.2)
# expect: supported ops:
import torch
from torch import nn

model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Softmax(dim=1), nn.Linear(4, 2))
example_input = torch.zeros(2, 3)
