# example_input is a numpy array, not a tensor.
# expect: model file defines no `example_input` tensor (found ndarray)
import numpy as np
from torch import nn

model = nn.Linear(3, 2)
example_input = np.zeros((2, 3), dtype=np.float32)
