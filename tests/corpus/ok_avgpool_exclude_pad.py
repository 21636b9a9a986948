# count_include_pad=False divides by a location-dependent count: per window a crop and a mean, joined by cat.
# outcome: compiles
import torch
from torch import nn

model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.AvgPool2d(2, padding=1, count_include_pad=False), nn.Flatten(),
                      nn.Linear(8, 2))
example_input = torch.zeros(2, 1, 4, 4)
