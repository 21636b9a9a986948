# ZeroPad2d with negative padding crops the image.
# expect: negative padding
# expect: self.1
import torch
from torch import nn

model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.ZeroPad2d((-1, 1, 0, -1)), nn.Flatten(), nn.Linear(24, 2))
example_input = torch.zeros(2, 1, 5, 5)
