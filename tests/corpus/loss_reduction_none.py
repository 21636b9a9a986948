# reduction='none' returns a vector, not a scalar loss.
# expect: unsupported reduction 'none' for loss 'cross_entropy'
# expect: use one of: mean, sum
import torch
from torch import nn

model = nn.Linear(3, 2)
example_input = torch.zeros(2, 3)
loss_fn = nn.CrossEntropyLoss(reduction="none")
