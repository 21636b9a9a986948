# PixelShuffle rearranges channels into space: no rule.
# expect: unsupported op 'pixelshuffle'
# expect: torch.nn.modules.pixelshuffle.PixelShuffle (self.1)
import torch
from torch import nn

model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.PixelShuffle(2), nn.Flatten(), nn.Linear(36, 2))
example_input = torch.zeros(2, 1, 5, 5)
