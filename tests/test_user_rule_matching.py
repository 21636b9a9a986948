"""Which rule a module gets: torch's classes by identity, user classes only through user rules, no silent override."""
import pytest
import torch
from sympy import exp
from torch import nn

import hbpc
from exactness import check_exact
from hbpc.compiler import compile_source
from hbpc.errors import HbpcError
from hbpc.rules import TABLE, USER_KEYS
from hbpc.rules.spec import Elementwise, Loss, k, t, x, z, Σ


class Pad(nn.Module):
    """A third-party padding module (as in BackPACK): attributes pad, mode, value, not nn.ZeroPad2d's padding."""

    def __init__(self, pad, mode="constant", value=0.0):
        super().__init__()
        self.pad, self.mode, self.value = pad, mode, value

    def forward(self, x):
        return nn.functional.pad(x, self.pad, self.mode, self.value)


class Tanh(nn.Module):
    """A user class named like a built-in rule that computes something else: 2x."""

    def forward(self, x):
        return 2 * x


def _data(C=3):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(4, 4, dtype=torch.float64, generator=generator),
            torch.randint(C, (4,), generator=generator), generator)


def test_a_third_party_module_named_like_a_built_in_is_traced_into():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), Pad((1, 2)), nn.Sigmoid(), nn.Linear(8, 3)).double()
    x, y, generator = _data()
    loss_fn = nn.CrossEntropyLoss()
    check_exact(hbpc.compile_model(model, x, loss_fn), model, loss_fn, x, y, "0.weight", generator)


def test_a_third_party_module_with_an_unsupported_option_is_refused_clearly():
    model = nn.Sequential(nn.Linear(4, 5), Pad((1, 2), value=1.0), nn.Linear(8, 3)).double()
    with pytest.raises(HbpcError, match="only zero padding"):
        hbpc.compile_model(model, torch.zeros(2, 4, dtype=torch.float64), nn.CrossEntropyLoss())


def test_a_user_class_named_tanh_is_not_the_built_in_tanh():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), Tanh(), nn.Sigmoid(), nn.Linear(5, 3)).double()
    x, y, generator = _data()
    loss_fn = nn.CrossEntropyLoss()
    source = compile_source(model, x, loss_fn)
    assert "torch.tanh" not in source
    check_exact(hbpc.compile_model(model, x, loss_fn), model, loss_fn, x, y, "0.weight", generator)


@pytest.mark.parametrize("rule", [
    Elementwise("tanh", 2 * x),
    Elementwise("mytanh", 2 * x, aliases=("leakyrelu",)),
    Loss("mse", Σ((z[k] - t[k]) ** 4, k), "dense", {"mean": lambda N, C: 1 / N}),
], ids=["key", "alias", "loss"])
def test_a_user_rule_named_like_a_built_in_is_refused(rule):
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).double()
    with pytest.raises(HbpcError, match="override=True") as error:
        hbpc.compile_model(model, torch.zeros(2, 4, dtype=torch.float64), nn.MSELoss(), rules=[rule])
    assert f"user rule '{rule.key}'" in str(error.value) and "built-in" in str(error.value)
    assert TABLE["tanh"].phi != 2 * x and not USER_KEYS  # the table is unchanged afterwards


def test_override_replaces_the_built_in_rule_on_purpose():
    """tanh written through exp, forward printed from φ: nn.Tanh now compiles through the user's rule."""
    rule = Elementwise("tanh", (exp(2 * x) - 1) / (exp(2 * x) + 1), override=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x_, y, generator = _data()
    loss_fn = nn.CrossEntropyLoss()
    source = compile_source(model, x_, loss_fn, rules=[rule])
    assert "torch.tanh(" not in source.split("class Curvature")[1] and "torch.exp" in source
    check_exact(hbpc.compile_model(model, x_, loss_fn, rules=[rule]), model, loss_fn, x_, y, "0.weight", generator)
    assert TABLE["tanh"].phi != rule.phi  # restored after the compile
