# nn.Softmax as a layer inside the network (a Normalization rule over the last axis).
# outcome: compiles
import torch
from torch import nn

model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Softmax(dim=1), nn.Linear(4, 2))
example_input = torch.zeros(2, 3)
