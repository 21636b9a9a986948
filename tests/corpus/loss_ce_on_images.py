# Cross-entropy (the default loss) on a 4-d output.
# expect: cross_entropy needs logits of shape (N, C), the model returns (N, (2, 3, 3))
# expect: module self.0
# expect: flatten the output or use MSELoss
import torch
from torch import nn

model = nn.Sequential(nn.Conv2d(1, 2, 3))
example_input = torch.zeros(2, 1, 5, 5)
