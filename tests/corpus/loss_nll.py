# NLLLoss on logits (no final log_softmax).
# expect: NLLLoss
# expect: log_softmax
# expect: loss_fn
import torch
from torch import nn

model = nn.Linear(3, 2)
example_input = torch.zeros(2, 3)
loss_fn = nn.NLLLoss()
