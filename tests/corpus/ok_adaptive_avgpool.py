# Global average pooling by nn.AdaptiveAvgPool2d(1).
# outcome: compiles
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 3, 2), nn.Sigmoid(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
example_input = torch.randn(3, 1, 4, 4)
