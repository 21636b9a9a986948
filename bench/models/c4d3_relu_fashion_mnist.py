"""c4d3 with ReLUs for Fashion-MNIST: ``examples/models/c4d3_fashion_mnist.py`` with every sigmoid a ReLU.

The time-to-target benchmark's ordinary CNN (``bench/time_to_target.py``), where first-order methods
do not stall. Same layers, shapes and seeded default initialization (853,178 parameters).
"""

from pathlib import Path

from torch import nn

import hbpc

_SIGMOID_C4D3 = Path(__file__).resolve().parents[2] / "examples" / "models" / "c4d3_fashion_mnist.py"


def build_model() -> nn.Sequential:
    """The example c4d3 with each ``nn.Sigmoid`` replaced by ``nn.ReLU``."""
    model, _, _ = hbpc.load_model(_SIGMOID_C4D3)
    return nn.Sequential(*(nn.ReLU() if isinstance(layer, nn.Sigmoid) else layer for layer in model))


_, example_input, loss_fn = hbpc.load_model(_SIGMOID_C4D3)
