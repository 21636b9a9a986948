# An unknown --loss on the command line.
# args: --loss hinge
# expect: unsupported loss 'hinge'
# expect: loss_fn / --loss
import torch
from torch import nn

model = nn.Linear(3, 2)
example_input = torch.zeros(2, 3)
