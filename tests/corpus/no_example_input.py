# No example_input.
# expect: model file defines no `example_input` tensor (found nothing)
# expect: no_example_input.py
# expect: define `example_input = torch.zeros(N, ...)`
from torch import nn

model = nn.Linear(3, 2)
