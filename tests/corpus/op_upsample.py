# Upsampling has no rule.
# expect: unsupported op 'upsample'
# expect: torch.nn.modules.upsampling.Upsample (self.1)
import torch
from torch import nn

model = nn.Sequential(nn.Conv2d(1, 1, 3), nn.Upsample(scale_factor=2), nn.Flatten(), nn.Linear(36, 2))
example_input = torch.zeros(2, 1, 5, 5)
