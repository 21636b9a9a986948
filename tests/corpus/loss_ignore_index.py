# ignore_index drops samples from the mean.
# expect: CrossEntropyLoss with ignore_index
# expect: not supported
# expect: loss_fn
import torch
from torch import nn

model = nn.Linear(3, 2)
example_input = torch.zeros(2, 3)
loss_fn = nn.CrossEntropyLoss(ignore_index=0)
