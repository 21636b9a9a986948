# L1Loss has no rule.
# expect: unsupported loss 'l1loss'
# expect: loss_fn
# expect: use one of: 
# expect: cross_entropy
import torch
from torch import nn

model = nn.Linear(3, 2)
example_input = torch.zeros(2, 3)
loss_fn = nn.L1Loss()
