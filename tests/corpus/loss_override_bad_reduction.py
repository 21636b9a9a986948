# An unknown reduction in --loss.
# args: --loss mse:max
# expect: unsupported reduction 'max' for loss 'mse'
import torch
from torch import nn

model = nn.Linear(3, 2)
example_input = torch.zeros(2, 3)
