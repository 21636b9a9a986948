# A single sample without its batch dimension.
# expect: example_input has shape (3,), but the first dimension must be the batch
# expect: add a batch dimension, e.g. x.unsqueeze(0)
import torch
from torch import nn

model = nn.Linear(3, 2)
example_input = torch.zeros(3)
