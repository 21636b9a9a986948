"""Nodes with the same rule and the same derived code share one family of methods, ``_<family>_<suffix>(self, node,
...)``, reading their shapes from the node; a node without such a twin keeps its own methods. Both stay exact."""
import re

import torch
from torch import nn

from exactness import assert_dense_exact
from hbpc.compiler import compile_source


def _definitions(text):
    return re.findall(r"^    def (\w+)\(", text, re.MULTILINE)


def test_layers_of_different_widths_share_one_family_and_stay_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x, t = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 1])
    text = compile_source(model, x[:2], nn.CrossEntropyLoss())
    definitions = _definitions(text)
    assert definitions.count("_linear_weight_block") == 1 and definitions.count("_tanh_residual") == 1
    assert not [d for d in definitions if re.match(r"_(linear|tanh)\d", d)]  # no per-layer copies
    assert "'linear2': (('tanh1',), {'weight': '2.weight', 'bias': '2.bias'}, 'linear')" in text
    assert_dense_exact(model, x, t, nn.CrossEntropyLoss())


def test_a_node_without_a_twin_keeps_its_own_methods():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x, t = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 1])
    text = compile_source(model, x[:2], nn.MSELoss(reduction="sum"))
    definitions = _definitions(text)
    assert "_tanh1_jvp" in definitions and "_tanh_jvp" not in definitions
    assert "'tanh1': (('linear0',), {}, None)" in text
    assert_dense_exact(model, x, torch.randn(3, 2, dtype=torch.float64), nn.MSELoss(reduction="sum"))
