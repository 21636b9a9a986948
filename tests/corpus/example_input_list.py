# example_input is a list, not a tensor.
# expect: model file defines no `example_input` tensor (found list)
from torch import nn

model = nn.Linear(3, 2)
example_input = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
