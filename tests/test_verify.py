"""Compile-time verification: every class of miscompile is refused with a message naming it, nothing is written."""
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import hbpc
from hbpc.cli import main
from hbpc.compiler import compile_graph, verified_module
from hbpc.errors import HbpcError
from hbpc.verify import verify

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "user_rules" / "model.py"
HEADER = "from sympy import cosh, exp, log\nfrom hbpc.rules.spec import Elementwise, Loss, k, t, x, z, Σ\n"
LOGCOSH = ('Loss("logcoshloss", Σ(log(cosh(z[k] - t[k])), k), target="dense", '
           'scale={"mean": lambda N, C: 1 / (N * C), "sum": lambda N, C: 1})')
SWISH2 = 'Elementwise("swish2", x / (1 + exp(-2 * x)))'


def _rules_file(tmp_path, swish2=SWISH2, loss=LOGCOSH):
    path = tmp_path / "rules.py"
    path.write_text(f"{HEADER}RULES = [{swish2}, {loss}]\n")
    return path


def _compile(tmp_path, capsys, rules, *flags):
    out = tmp_path / "curv.py"
    status = main(["compile", str(MODEL), "--rules", str(rules), "-o", str(out), *flags])
    return status, capsys.readouterr(), out


def test_correct_user_rules_pass_and_say_so(tmp_path, capsys):
    status, io, out = _compile(tmp_path, capsys, _rules_file(tmp_path))
    assert status == 0 and out.exists()
    assert "verified against autograd" in io.out


CASES = {  # miscompile: (rules, words the refusal must contain)
    "phi-not-the-module": (
        dict(swish2='Elementwise("swish2", x / (1 + exp(-3 * x)), "{x} * torch.sigmoid(2 * {x})")'),
        ["gradient disagrees with autograd", "node `swish21`", "rule 'swish2'", "φ = x/(1 + exp(-3*x))"]),
    "forward-string-wrong": (
        dict(swish2='Elementwise("swish2", x / (1 + exp(-2 * x)), "{x} * torch.sigmoid(3 * {x})")'),
        ["loss disagrees with autograd", "node `swish21`", "rule 'swish2'", "forward `{x} * torch.sigmoid(3 * {x})`",
         "does not compute what the module does"]),
    "phi-printed-as-forward-wrong": (
        dict(swish2='Elementwise("swish2", x / (1 + exp(-3 * x)))'),
        ["loss disagrees with autograd", "node `swish21`", "its φ = x/(1 + exp(-3*x)) does not compute"]),
    "loss-rule-not-the-loss-module": (
        dict(loss=LOGCOSH.replace("log(cosh(z[k] - t[k]))", "(z[k] - t[k])**2")),
        ["loss disagrees with autograd", "the loss rule 'logcoshloss'"]),
    "loss-scale-wrong": (
        dict(loss=LOGCOSH.replace("1 / (N * C)", "1 / N")),
        ["loss disagrees with autograd", "the loss rule 'logcoshloss'", "scale for reduction 'mean'"]),
    "forward-does-not-import": (
        dict(swish2='Elementwise("swish2", x / (1 + exp(-2 * x)), "{x} *+* torch.sigmoid(2 * {x})")'),
        ["fails to import: SyntaxError", "node `swish21`", "rule 'swish2'", "generated line"]),
    "forward-fails-on-first-call": (
        dict(swish2='Elementwise("swish2", x / (1 + exp(-2 * x)), "{x} * torch.sigmoidd(2 * {x})")'),
        ["fails when first run: AttributeError", "sigmoidd", "node `swish21`", "generated line"]),
}


@pytest.mark.parametrize("case", CASES)
def test_miscompile_is_refused_naming_the_rule_and_nothing_is_written(tmp_path, capsys, case):
    rules, words = CASES[case]
    status, io, out = _compile(tmp_path, capsys, _rules_file(tmp_path, **rules))
    assert status == 2
    assert io.err.startswith("hbpc: error: ")
    for word in words:
        assert word in io.err, (word, io.err)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rules.py"]  # no temporary file left either


def test_no_verify_writes_the_module(tmp_path, capsys):
    rules = _rules_file(tmp_path, swish2=CASES["phi-not-the-module"][0]["swish2"])
    status, io, out = _compile(tmp_path, capsys, rules, "--no-verify")
    assert status == 0 and out.exists()
    assert "not verified" in io.out
    assert "class Curvature" in out.read_text()


def test_compile_model_verifies_unless_told_not_to(tmp_path):
    model, example, loss_fn = hbpc.load_model(MODEL)
    rules = _rules_file(tmp_path, swish2=CASES["phi-not-the-module"][0]["swish2"])
    with pytest.raises(HbpcError, match="gradient disagrees with autograd"):
        hbpc.compile_model(model, example, loss_fn, rules=rules)
    module = hbpc.compile_model(model, example, loss_fn, rules=rules, verify=False)
    assert hasattr(module, "Curvature")


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _small_module():
    torch.manual_seed(0)
    model, x, loss_fn = Small(), torch.randn(2, 3), nn.CrossEntropyLoss()
    graph, text = compile_graph(model, x, loss_fn)
    return model, x, loss_fn, graph, verified_module(graph, text, model, x, loss_fn, verify=False)


def _perturbed(method, scale=1.01):
    """A Curvature method whose result is off by 1 %, for each kind of result it returns."""

    def wrong(*args, **kwargs):
        result = method(*args, **kwargs)
        if isinstance(result, dict):
            return {name: _scaled(value, scale) for name, value in result.items()}
        return _scaled(result, scale)

    return wrong


def _scaled(value, scale):
    if isinstance(value, list):
        return [v * scale for v in value]
    if callable(value) and not torch.is_tensor(value):
        return lambda v, f=value: f(v) * scale
    if hasattr(value, "__matmul__") and not torch.is_tensor(value):
        return type("Off", (), {"__matmul__": lambda self, v, b=value: (b @ v) * scale})()
    return value * scale


@pytest.mark.parametrize("method, quantity", [
    ("ggn_vector_product", "GGN-vector product"), ("hessian_vector_product", "Hessian-vector product"),
    ("block_products", "Hessian block product of fc1.weight"), ("blocks", "HBP block of fc1.weight at N = 1"),
    ("forward_backward", "loss")])
def test_each_quantity_is_checked(method, quantity, monkeypatch):
    model, x, loss_fn, graph, module = _small_module()
    verify(graph, module, model, x, loss_fn)  # the module as generated passes
    monkeypatch.setattr(module.Curvature, method, _perturbed(getattr(module.Curvature, method)))
    with pytest.raises(HbpcError, match=f"{quantity} disagrees with autograd: max error"):
        verify(graph, module, model, x, loss_fn)


def test_a_wrong_parameter_gradient_is_refused(monkeypatch):
    model, x, loss_fn, graph, module = _small_module()
    original = module.accumulate_grad
    monkeypatch.setattr(module, "accumulate_grad", lambda p, g: original(p, 1.01 * g))
    with pytest.raises(HbpcError, match="gradient disagrees with autograd"):
        verify(graph, module, model, x, loss_fn)


def test_verification_leaves_the_users_model_alone():
    torch.manual_seed(0)
    model, x = Small(), torch.randn(2, 3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = torch.random.get_rng_state()
    hbpc.compile_model(model, x, nn.CrossEntropyLoss())
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert torch.equal(torch.random.get_rng_state(), state)


def test_without_loss_fn_cross_entropy_is_announced_and_recorded(tmp_path, capsys):
    model_file = tmp_path / "model.py"
    model_file.write_text("import torch\nfrom torch import nn\nmodel = nn.Linear(3, 2)\n"
                          "example_input = torch.randn(2, 3)\n")
    out = tmp_path / "curv.py"
    assert main(["compile", str(model_file), "-o", str(out)]) == 0
    assert "hbpc: note: no loss_fn given: hbpc assumes nn.CrossEntropyLoss()" in capsys.readouterr().err
    assert "the model gave no loss_fn, so hbpc assumed nn.CrossEntropyLoss()" in out.read_text()
    with pytest.warns(UserWarning, match="no loss_fn given"):
        module = hbpc.compile_model(nn.Linear(3, 2), torch.randn(2, 3))
    assert "assumed nn.CrossEntropyLoss()" in module.__doc__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = hbpc.compile_model(nn.Linear(3, 2), torch.randn(2, 3), nn.CrossEntropyLoss())
    assert "assumed" not in module.__doc__


class BiasOnlyNorm(nn.Module):
    """torch cannot differentiate a bias-only layer_norm twice: the reference, not the module, is missing."""

    def __init__(self):
        super().__init__()
        self.fc, self.shift = nn.Linear(3, 4), nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.layer_norm(self.fc(x), [4], None, self.shift)


def test_when_autograd_cannot_give_a_reference_the_check_warns_instead_of_blaming_the_module(tmp_path, capsys):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="verified the generated module only partly: torch.autograd cannot"):
        module = hbpc.compile_model(BiasOnlyNorm(), torch.randn(2, 3), nn.MSELoss())
    assert hasattr(module, "Curvature")


def test_a_loss_without_a_torch_module_is_not_claimed_verified(tmp_path, capsys):
    rules = _rules_file(tmp_path)
    status, io, out = _compile(tmp_path, capsys, rules, "--loss", "logcoshloss")
    assert status == 0 and out.exists()
    assert "hbpc: warning: hbpc could not verify the generated module: torch has no loss module" in io.err
    assert "verification incomplete" in io.out and "verified against autograd" not in io.out


@pytest.mark.parametrize("loss", ["mse:sum", "bce_with_logits", "huber", "smooth_l1:sum", "cross_entropy"])
def test_loss_given_on_the_command_line_is_verified_against_its_torch_module(tmp_path, capsys, loss):
    status, io, out = _compile(tmp_path, capsys, _rules_file(tmp_path), "--loss", loss)
    assert status == 0 and "verified against autograd" in io.out



def test_a_wrong_loss_hessian_is_named_as_the_loss_rules(monkeypatch):
    model, x, loss_fn, graph, module = _small_module()
    monkeypatch.setattr(module.Curvature, "_loss_hessian_product",
                        _perturbed(module.Curvature._loss_hessian_product))
    with pytest.raises(HbpcError, match=r"GGN-vector product disagrees .* the loss rule 'cross_entropy': its Hessian"):
        verify(graph, module, model, x, loss_fn)


def test_a_wrong_residual_is_named_as_the_second_derivatives(monkeypatch):
    model, x, loss_fn, graph, module = _small_module()
    original = module.residual_product
    monkeypatch.setattr(module, "residual_product", lambda r, t, curvature: original(1.5 * r, t, curvature))
    with pytest.raises(HbpcError, match=r"Hessian-vector product disagrees .*\(second derivatives φ″\) of the rules 'tanh'"):
        verify(graph, module, model, x, loss_fn)
