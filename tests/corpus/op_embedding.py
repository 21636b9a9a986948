# An embedding takes integer indices.
# expect: unsupported op 'embedding'
# expect: torch.nn.modules.sparse.Embedding (self.0)
import torch
from torch import nn

model = nn.Sequential(nn.Embedding(10, 3), nn.Flatten(), nn.Linear(12, 2))
example_input = torch.zeros(2, 4, dtype=torch.long)
