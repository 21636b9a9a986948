"""A 2-layer causal GPT for character-level language modelling, written the way nanoGPT writes it.

    tokens (N, T) -> token embedding (97 → 32) + learned positions (T ≤ 64)
    -> 2 × [x + attention(LayerNorm(x)), x + MLP(LayerNorm(x))]   (2 heads, causal mask, GELU MLP 32→128→32)
    -> LayerNorm -> logits through the tied embedding (32 → 97), returned as (N, 97, T)

The vocabulary is hbpc.data.text.VOCABULARY (97 characters); loss_fn is cross-entropy over the (N, C, T) logits.
The sizes are keyword arguments (the tests build a tiny one).
Default PyTorch initialization, seeded: 30,624 parameters (the output layer shares the embedding).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, BLOCK, WIDTH, HEADS, LAYERS = 97, 64, 32, 2, 2


class CausalSelfAttention(nn.Module):
    def __init__(self, width=WIDTH, heads=HEADS, block=BLOCK):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, width=WIDTH, heads=HEADS, block=BLOCK):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(width), CausalSelfAttention(width, heads, block)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab=VOCAB, width=WIDTH, heads=HEADS, layers=LAYERS, block=BLOCK):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(block, width)
        self.blocks = nn.Sequential(*[Block(width, heads, block) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input and output embedding

    def forward(self, idx):
        B, T = idx.size()
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        logits = self.lm_head(self.ln_f(self.blocks(x)))   # (N, T, V)
        return logits.transpose(1, 2)                      # (N, V, T): what nn.CrossEntropyLoss takes


def build_model() -> GPT:
    torch.manual_seed(0)
    return GPT()


example_input = torch.zeros(2, BLOCK, dtype=torch.long)
loss_fn = nn.CrossEntropyLoss()
