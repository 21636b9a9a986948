"""A small sequence classifier: RMSNorm, self-attention with a constant padding mask, mean pooling over tokens.

    tokens (N, 12) -> embedding (97 → 16) -> RMSNorm
    -> x + attention(x) with the last 4 positions masked out as padding (scores set to -inf), 1 head
    -> RMSNorm -> mean over the 8 unmasked tokens -> Linear 10

The vocabulary is hbpc.data.text.VOCABULARY (97 characters).
Tested in tests/test_transformers.py (the sizes are keyword arguments: the test builds a tiny one).
Default PyTorch initialization, seeded.
"""

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, LENGTH, WIDTH, PADDED = 97, 12, 16, 4


class Encoder(nn.Module):
    def __init__(self, vocab=VOCAB, length=LENGTH, width=WIDTH, padded=PADDED, classes=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm_1 = nn.RMSNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.norm_2 = nn.RMSNorm(width, eps=1e-6)
        self.head = nn.Linear(width, classes)
        padding = torch.zeros(length, dtype=torch.bool)
        padding[length - padded:] = True
        self.register_buffer("padding", padding)
        self.width, self.unpadded = width, length - padded

    def forward(self, tokens):
        x = self.norm_1(self.embed(tokens))                                    # (N, T, D)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = (q @ k.transpose(1, 2)) / self.width ** 0.5                        # (N, T, T)
        scores = scores.masked_fill(self.padding, float("-inf"))              # keys at padded positions
        x = self.norm_2(x + F.softmax(scores, dim=-1) @ v)
        return self.head(x[:, : self.unpadded].mean(dim=1))


def build_model() -> Encoder:
    torch.manual_seed(0)
    return Encoder()


example_input = torch.zeros(2, LENGTH, dtype=torch.long)
loss_fn = nn.CrossEntropyLoss()
