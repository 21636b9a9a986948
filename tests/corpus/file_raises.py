# The model file raises while it is executed.
# expect: model file raised RuntimeError: boom
# expect: {here}
# expect: importable on its own
import torch
from torch import nn

model = nn.Linear(3, 2)
raise RuntimeError("boom")  # here
