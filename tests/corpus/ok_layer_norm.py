# nn.LayerNorm with elementwise affine in a pre-norm residual block, and one without bias over (C, H, W).
# outcome: compiles
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2)
        self.norm0 = nn.LayerNorm((2, 2, 2), bias=False)
        self.fc = nn.Linear(8, 4)
        self.norm = nn.LayerNorm(4)
        self.mlp = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 4))
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(torch.tanh(self.norm0(self.conv(x))).flatten(1))
        h = h + self.mlp(self.norm(h))
        return self.out(h)


torch.manual_seed(0)
model = Model()
for p in (model.norm0.weight, model.norm.weight, model.norm.bias):
    nn.init.normal_(p, 1.0, 0.5)
example_input = torch.randn(3, 1, 3, 3)
