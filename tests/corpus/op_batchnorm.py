# BatchNorm in training mode couples the samples of a batch (eval mode compiles).
# expect: BatchNorm in training mode
# expect: model.eval()
# expect: torch.nn.modules.batchnorm.BatchNorm2d (self.1)
import torch
from torch import nn

model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(18, 2))
example_input = torch.zeros(2, 1, 5, 5)
