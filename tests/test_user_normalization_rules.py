"""A user Normalization rule (an RMSNorm of its own; torch's nn.RMSNorm is built in) loaded from a --rules file:
compiled and exact against autograd."""
import pytest
import torch
from torch import nn

import hbpc
from exactness import check_exact
from hbpc.errors import HbpcError
from hbpc.export import load_rules_file

RULES = '''
from sympy import sqrt, symbols
from hbpc.rules.spec import Mean, Normalization, eps, x

ms = symbols("ms", real=True)
RULES = [Normalization("myrmsnorm", statistics=((ms, Mean(x**2)),), phi=x / sqrt(ms + eps),
                       forward="{x} / torch.sqrt(({x}**2).mean(-1, keepdim=True) + {eps})", hyper={"eps": 1e-6},
                       affine={("weight",): "entry_scale"})]
'''


class MyRMSNorm(nn.Module):
    def __init__(self, size, eps=1e-6, affine=True):
        super().__init__()
        self.normalized_shape, self.eps = (size,), eps
        if affine:
            self.weight = nn.Parameter(1 + 0.1 * torch.randn(size))

    def forward(self, x):
        y = x / torch.sqrt((x**2).mean(-1, keepdim=True) + self.eps)
        return y * self.weight if hasattr(self, "weight") else y


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "rules.py"
    path.write_text(RULES)
    return str(path)


@pytest.mark.parametrize("affine", [True, False], ids=["weight", "plain"])
def test_user_rmsnorm_rule_from_a_file_is_exact(rules, affine):
    loaded = load_rules_file(rules)
    assert [type(rule).__name__ for rule in loaded] == ["Normalization"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), MyRMSNorm(5, eps=1e-3, affine=affine), nn.Tanh(), nn.Linear(5, 3)).double()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, dtype=torch.float64, generator=generator)
    y = torch.randint(3, (4,), generator=generator)
    loss_fn = nn.CrossEntropyLoss()
    module = hbpc.compile_model(model, x, loss_fn, rules=rules)
    check_exact(module, model, loss_fn, x, y, "0.weight", generator)
    if affine:
        check_exact(module, model, loss_fn, x, y, "1.weight", generator)


def test_a_module_without_normalized_shape_is_refused(rules):
    module = MyRMSNorm(5)
    del module.normalized_shape
    model = nn.Sequential(nn.Linear(4, 5), module, nn.Linear(5, 3)).double()
    with pytest.raises(HbpcError, match="needs an attribute normalized_shape"):
        hbpc.compile_model(model, torch.zeros(2, 4, dtype=torch.float64), nn.CrossEntropyLoss(), rules=rules)


def test_parameters_without_an_affine_rule_are_refused(rules, tmp_path):
    path = tmp_path / "no_affine.py"
    path.write_text(RULES.replace(', hyper={"eps": 1e-6},\n                       affine={("weight",): "entry_scale"})',
                                  ', hyper={"eps": 1e-6})'))
    model = nn.Sequential(nn.Linear(4, 5), MyRMSNorm(5), nn.Linear(5, 3)).double()
    with pytest.raises(HbpcError, match="names no affine rule"):
        hbpc.compile_model(model, torch.zeros(2, 4, dtype=torch.float64), nn.CrossEntropyLoss(), rules=str(path))


def test_a_selection_rule_with_an_unknown_primitive_is_refused(tmp_path):
    path = tmp_path / "rules.py"
    path.write_text("from hbpc.rules.spec import Selection\nRULES = [Selection('shuffle', 'permute', '{x}')]\n")
    with pytest.raises(HbpcError, match="primitive 'permute'"):
        load_rules_file(str(path))
