# Recurrent layers are not chains of supported ops.
# expect: unsupported op 'lstm'
# expect: {here}
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        out, _ = self.lstm(x)  # here
        return self.fc(out[:, -1])


model = M()
example_input = torch.zeros(2, 5, 3)
