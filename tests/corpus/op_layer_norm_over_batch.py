# LayerNorm whose normalized_shape includes the batch dimension mixes the samples.
# expect: layer_norm over the batch dimension couples the samples
# expect: {here}
import torch
import torch.nn.functional as F
from torch import nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = F.layer_norm(self.fc(x), (2, 4))  # here
        return self.out(h)


model = Model()
example_input = torch.zeros(2, 3)
