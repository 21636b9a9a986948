# Class weights change the loss Hessian.
# expect: CrossEntropyLoss with weight
# expect: not supported
import torch
from torch import nn

model = nn.Linear(3, 2)
example_input = torch.zeros(2, 3)
loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0]))
