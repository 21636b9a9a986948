# count_include_pad=False divides by a location-dependent count.
# expect: only ceil_mode=False, count_include_pad=True, divisor_override=None are supported
# expect: torch.nn.modules.pooling.AvgPool2d (self.1)
import torch
from torch import nn

model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.AvgPool2d(2, padding=1, count_include_pad=False), nn.Flatten(),
                      nn.Linear(8, 2))
example_input = torch.zeros(2, 1, 4, 4)
