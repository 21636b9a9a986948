# loss_fn must be a module, not a name.
# expect: `loss_fn` must be an nn.Module such as nn.CrossEntropyLoss(), got str
# expect: set `loss_fn = nn.CrossEntropyLoss()` or `nn.MSELoss()`, or remove it
import torch
from torch import nn

model = nn.Linear(3, 2)
example_input = torch.zeros(2, 3)
loss_fn = "mse"
