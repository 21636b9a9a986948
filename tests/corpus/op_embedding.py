# An embedding takes integer indices: the model's input is token ids.
# outcome: compiles
import torch
from torch import nn

model = nn.Sequential(nn.Embedding(10, 3), nn.Flatten(), nn.Linear(12, 2))
example_input = torch.tensor([[0, 3, 9, 3], [5, 1, 1, 2]])
