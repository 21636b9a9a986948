# A loop over the batch dimension is unrolled for the example's batch size (sizes are specialized while tracing),
# and refused: its ops index single samples, so they do not keep the batch first.
# expect: the model uses ops hbpc cannot compile
# expect: does not keep the batch (2) as its first axis (hbpc compiles per-sample maps): node `getitem`
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        rows = [self.fc(x[i]) for i in range(x.shape[0])]
        return torch.stack(rows)


model = M()
example_input = torch.zeros(2, 3)
