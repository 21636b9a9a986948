# Label smoothing changes the targets, not the loss Hessian's form.
# outcome: compiles
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 3))
example_input = torch.randn(3, 3)
loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
