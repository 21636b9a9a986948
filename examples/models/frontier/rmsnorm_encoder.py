"""A small sequence classifier: RMSNorm, self-attention with a constant padding mask, mean pooling over tokens.

    tokens (N, 12) -> embedding (97 → 16) -> RMSNorm
    -> x + attention(x) with the last 4 positions masked out as padding (scores set to -inf), 1 head
    -> RMSNorm -> mean over the 8 unmasked tokens -> Linear 10

The vocabulary is hbpc.data.text.VOCABULARY (97 characters).
Not compiled yet (issue 16): embeddings, matmul between activations, masking and softmax have no rules.
Default PyTorch initialization, seeded.
"""

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, LENGTH, WIDTH, PADDED = 97, 12, 16, 4


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.norm_1 = nn.RMSNorm(WIDTH, eps=1e-6)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.norm_2 = nn.RMSNorm(WIDTH, eps=1e-6)
        self.head = nn.Linear(WIDTH, 10)
        padding = torch.zeros(LENGTH, dtype=torch.bool)
        padding[LENGTH - PADDED:] = True
        self.register_buffer("padding", padding)

    def forward(self, tokens):
        x = self.norm_1(self.embed(tokens))                                    # (N, T, D)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = (q @ k.transpose(1, 2)) / WIDTH ** 0.5                        # (N, T, T)
        scores = scores.masked_fill(self.padding, float("-inf"))              # keys at padded positions
        x = self.norm_2(x + F.softmax(scores, dim=-1) @ v)
        return self.head(x[:, : LENGTH - PADDED].mean(dim=1))


def build_model() -> Encoder:
    torch.manual_seed(0)
    return Encoder()


example_input = torch.zeros(2, LENGTH, dtype=torch.long)
loss_fn = nn.CrossEntropyLoss()
