"""A small Vision Transformer for 28×28 images (Fashion-MNIST).

    (N, 1, 28, 28) -> patch conv (7×7, stride 7: 16 patches of width 32) -> tokens (N, 16, 32)
    -> a learned CLS token in front (N, 17, 32) + learned positions
    -> 1 × [x + nn.MultiheadAttention(LayerNorm(x)) (2 heads), x + MLP(LayerNorm(x)) (GELU, 32→64→32)]
    -> LayerNorm of the CLS token x[:, 0] -> Linear 10

The CLS token is a zero crop of the tokens shifted by the parameter, then cat (exact); nn.MultiheadAttention is
lowered to shared Linear projections, heads, matmul, softmax. The sizes are keyword arguments (the tests build a
tiny one).
Default PyTorch initialization, seeded.
"""

import torch
from torch import nn

WIDTH, HEADS, PATCH = 32, 2, 7


class ViT(nn.Module):
    def __init__(self, width=WIDTH, heads=HEADS, patch=PATCH, size=28, classes=10):
        super().__init__()
        self.patches = nn.Conv2d(1, width, patch, stride=patch)
        tokens = (size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        self.norm_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.patches(x).flatten(2).transpose(1, 2)                        # (N, 16, 32)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (N, 17, 32)
        x = x + self.pos_embed
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm_2(x))
        return self.head(self.norm(x[:, 0]))


def build_model() -> ViT:
    torch.manual_seed(0)
    return ViT()


example_input = torch.zeros(2, 1, 28, 28)
loss_fn = nn.CrossEntropyLoss()
