# A loss function instead of a loss module.
# expect: `loss_fn` must be an nn.Module such as nn.CrossEntropyLoss(), got function
import torch
import torch.nn.functional as F
from torch import nn

model = nn.Linear(3, 2)
example_input = torch.zeros(2, 3)
loss_fn = F.mse_loss
