"""A small Vision Transformer for 28×28 images (Fashion-MNIST).

    (N, 1, 28, 28) -> patch conv (7×7, stride 7: 16 patches of width 32) -> tokens (N, 16, 32)
    -> a learned CLS token in front (N, 17, 32) + learned positions
    -> 1 × [x + nn.MultiheadAttention(LayerNorm(x)) (2 heads), x + MLP(LayerNorm(x)) (GELU, 32→64→32)]
    -> LayerNorm of the CLS token x[:, 0] -> Linear 10

Not compiled yet (issue 16): the CLS token (a parameter concatenated to the tokens), Linear on (N, T, D)
and attention have no rules.
Default PyTorch initialization, seeded.
"""

import torch
from torch import nn

WIDTH, HEADS, PATCH = 32, 2, 7


class ViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patches = nn.Conv2d(1, WIDTH, PATCH, stride=PATCH)
        tokens = (28 // PATCH) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, WIDTH) * 0.02)
        self.norm_1 = nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.norm_2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, 10)

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
