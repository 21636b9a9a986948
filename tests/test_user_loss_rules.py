"""User loss rules with every construct of the rule language: fixed and free indices, sums, deltas, products.

Each is compiled with a matching nn.Module loss and checked against autograd in float64; constructs
that have no torch form are refused at compile time, naming the rule and the term.
"""
import pytest
import sympy as sp
import torch
from sympy import KroneckerDelta, exp, log, tanh
from torch import nn

import hbpc
from exactness import check_exact
from hbpc.cli import main
from hbpc.compiler import import_generated
from hbpc.errors import HbpcError
from hbpc.rules.spec import Loss, k, t, z, Σ

m = sp.Symbol("m", integer=True)
PER_SAMPLE = {"mean": lambda N, C: 1 / N, "sum": lambda N, C: 1}


class TorchLoss(nn.Module):
    """``mean_n ℓ(z_n, t_n)`` for a per-sample ``ℓ`` given as a torch function of (N, C) tensors → (N,)."""

    def __init__(self, ell):
        super().__init__()
        self.ell, self.reduction = ell, "mean"

    def forward(self, z, target):
        return self.ell(z, target).mean()


# (id, ℓ in the rule language, the same ℓ in torch)
CASES = [
    ("first-heavy", (z[0] - t[0]) ** 2 + Σ((z[k] - t[k]) ** 2, k),
     lambda z, t: (z[:, 0] - t[:, 0]) ** 2 + ((z - t) ** 2).sum(1)),
    ("fixed-index-product", z[0] * z[1] * t[2] + Σ(z[k] ** 2, k) / 2,
     lambda z, t: z[:, 0] * z[:, 1] * t[:, 2] + (z**2).sum(1) / 2),
    ("product-of-indexed-terms", Σ(z[k] ** 2 * t[k] ** 2 + z[k] * t[k] * z[1], k),
     lambda z, t: (z**2 * t**2 + z * t * z[:, 1:2]).sum(1)),
    ("product-of-sums", Σ(z[k], k) * Σ(z[k] * t[k], k) + Σ(tanh(z[k]) ** 2, k),
     lambda z, t: z.sum(1) * (z * t).sum(1) + (torch.tanh(z) ** 2).sum(1)),
    ("double-sum", Σ((z[k] - z[m]) ** 2, k, m) / 4 + Σ(z[k] * t[m], k, m),
     lambda z, t: ((z[:, :, None] - z[:, None, :]) ** 2).sum((1, 2)) / 4 + z.sum(1) * t.sum(1)),
    ("sum-inside-sum", Σ((z[k] - Σ(z[m], m) / 3) ** 2, k),
     lambda z, t: ((z - z.sum(1, keepdim=True) / 3) ** 2).sum(1)),
    ("kronecker-delta", Σ(KroneckerDelta(k, 2) * exp(z[k]) + (z[k] - t[k]) ** 2, k),
     lambda z, t: torch.exp(z[:, 2]) + ((z - t) ** 2).sum(1)),
    ("sum-of-a-constant", Σ(z[0] ** 2, k) + Σ(log(1 + exp(z[k])), k),
     lambda z, t: 3 * z[:, 0] ** 2 + nn.functional.softplus(z).sum(1)),
    ("log-sum-exp-with-fixed-index", log(Σ(exp(z[k]), k)) - z[1] + z[0] * t[0],
     lambda z, t: torch.logsumexp(z, 1) - z[:, 1] + z[:, 0] * t[:, 0]),
    ("linear-in-z", Σ(z[k], k) + Σ(z[k] * t[k], k),
     lambda z, t: z.sum(1) + (z * t).sum(1)),
]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("ell, reference", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_loss_rule_is_exact(ell, reference):
    key = "userloss"
    rule = Loss(key, ell, target="dense", scale=PER_SAMPLE)
    loss_fn = type("UserLoss", (TorchLoss,), {})(reference)
    model = _model()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, dtype=torch.float64, generator=generator)
    targets = torch.randn(4, 3, dtype=torch.float64, generator=generator)
    module = hbpc.compile_model(model, x, loss_fn, rules=[rule])
    check_exact(module, model, loss_fn, x, targets, "0.weight", generator)


def test_the_reported_rule_file_compiles_and_is_exact(tmp_path):
    """The rule and module from the report, through `hbpc compile --rules`."""
    rules = tmp_path / "rules.py"
    rules.write_text(
        "from hbpc.rules.spec import Loss, k, t, z, Σ\n"
        "RULES = [Loss('firstheavyloss', (z[0] - t[0]) ** 2 + Σ((z[k] - t[k]) ** 2, k), target='dense',\n"
        "              scale={'mean': lambda N, C: 1 / N, 'sum': lambda N, C: 1})]\n")
    model_file = tmp_path / "model.py"
    model_file.write_text(
        "import torch\nfrom torch import nn\n"
        "class FirstHeavyLoss(nn.Module):\n"
        "    reduction = 'mean'\n"
        "    def forward(self, z, t):\n"
        "        return ((z[:, 0] - t[:, 0]) ** 2 + ((z - t) ** 2).sum(1)).mean()\n"
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3))\n"
        "example_input = torch.zeros(2, 4)\n"
        "loss_fn = FirstHeavyLoss()\n")
    out = tmp_path / "curv.py"
    assert main(["compile", str(model_file), "--rules", str(rules), "-o", str(out)]) == 0
    namespace = {}
    exec(model_file.read_text(), namespace)
    model, loss_fn = namespace["model"].double(), namespace["loss_fn"]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64, generator=generator)
    targets = torch.randn(5, 3, dtype=torch.float64, generator=generator)
    check_exact(import_generated(out), model, loss_fn, x, targets, "2.weight", generator)


REFUSED = [
    ("coupled-sum", Σ(exp(z[k] * z[m]), k, m), "does not separate into one factor per index"),
    ("coupled-nested-sum", Σ(z[k] * Σ(exp(z[k] * z[m]), m), k), "couples the summed index"),
    ("free-index", (z[k] - t[k]) ** 2, "is not summed"),
    ("sub-range", sp.Sum(z[k] ** 2, (k, 0, 1)), "sums run over all classes"),
    ("negative-index", z[-1] ** 2 + Σ(z[k] ** 2, k), "non-negative integer"),
    ("shifted-index", Σ(z[k + 1] ** 2, k), "non-negative integer"),
    ("two-indices", Σ(sp.IndexedBase("z", real=True)[k, k], k), "one index"),
    ("foreign-tensor", Σ(sp.IndexedBase("w")[k] * z[k], k), "reads only the logits"),
    ("unknown-symbol", Σ(sp.Symbol("a") * z[k] ** 2, k), "neither z, t nor hyper-parameters"),
    ("no-logits", Σ(t[k] ** 2, k), "does not read the logits"),
]


@pytest.mark.parametrize("ell, message", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_unprintable_loss_rules_are_refused_at_compile_time(ell, message):
    rule = Loss("badloss", ell, target="dense", scale=PER_SAMPLE)
    loss_fn = type("BadLoss", (TorchLoss,), {})(lambda z, t: (z**2).sum(1))
    with pytest.raises(HbpcError, match=message) as error:
        hbpc.compile_model(_model(), torch.zeros(2, 4, dtype=torch.float64), loss_fn, rules=[rule])
    assert "badloss" in str(error.value)


def test_a_fixed_index_beyond_the_classes_is_refused():
    rule = Loss("farloss", z[5] ** 2 + Σ(z[k] ** 2, k), target="dense", scale=PER_SAMPLE)
    loss_fn = type("FarLoss", (TorchLoss,), {})(lambda z, t: (z**2).sum(1))
    with pytest.raises(HbpcError, match="reads entry 5 of the logits, but the model has 3 outputs") as error:
        hbpc.compile_model(_model(), torch.zeros(2, 4, dtype=torch.float64), loss_fn, rules=[rule])
    assert "farloss" in str(error.value)
