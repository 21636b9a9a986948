"""LayerNorm: the derived products against torch, and every curvature quantity on models with it (float64).

The chain models with LayerNorm are in the zoo (`models.py`: block products in all four modes, HBP
blocks, full products); here are the derivation itself, graphs (a pre-norm residual block, functional
forms with parameters, LayerNorm on the input), positive semi-definiteness of the PCH, the MC Fisher
and the CLI.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp, vjp

import hbpc
import hbpc.ir
from conftest import compiled
from hbpc.cli import main
from hbpc.derive import derive
from hbpc.rules import AFFINE, TABLE
from hbpc.rules.spec import x, y
from models import SETTINGS, layer_norm
from test_full_products import _true_ggn, _true_hessian, parameter_slices

CURVATURES = ["hessian", "ggn", "pch-abs", "pch-clip"]
FLAGS = list(itertools.product([True, False], repeat=2))
LAYER_NORM_SETTINGS = [s for s in SETTINGS if "layernorm" in s.id]


def _derived(which, scope, eps):
    """Evaluate the derived ``which`` (jvp, vjp or residual) of layer_norm with torch on ``scope``."""
    lines, expr = derive(TABLE["layer_norm"]).code(which, {"eps": eps})
    scope = {"torch": torch, **scope}
    for line in lines:
        target, value = line.split(" = ", 1)
        scope[target] = eval(value, scope)
    return eval(expr, scope)


def test_derived_products_match_autograd():
    """J v, Jᵀ u and R t = Σ_i g_i ∂²y_i/∂x² v, for groups of 5 entries on the last axis."""
    eps = 1e-3
    generator = torch.Generator().manual_seed(0)
    inputs, v, u, g, t = (torch.randn(2, 3, 5, generator=generator, dtype=torch.float64) for _ in range(5))
    inputs = 2 * inputs + 1  # a mean and variance far from 0 and 1

    def f(a):
        return F.layer_norm(a, (5,), eps=eps)

    out = f(inputs)
    var = inputs.var(-1, unbiased=False, keepdim=True)
    scope = {"y": out, "var": var, "v": v, "u": u, "g": g, "t": t}
    assert torch.allclose(_derived("jvp", scope, eps), jvp(f, (inputs,), (v,))[1])
    assert torch.allclose(_derived("vjp", scope, eps), vjp(f, inputs)[1](u)[0])
    grad_of_gy = torch.func.grad(lambda a: (g * f(a)).sum())
    assert torch.allclose(_derived("residual", scope, eps), jvp(grad_of_gy, (inputs,), (t,))[1])


def test_layer_norm_is_stated_as_statistics_and_derived_in_the_output():
    rule, derivation = TABLE["layer_norm"], derive(TABLE["layer_norm"])
    assert [str(s) for s, _ in rule.statistics] == ["mu", "var"]
    for expr in (derivation.jvp, derivation.vjp, derivation.residual):  # x and μ are gone: y and var suffice
        assert {str(s) for s in expr.free_symbols} <= {"y", "var", "eps", "v", "u", "g", "t"}
    assert derivation.reads() == [y, rule.statistics[1][0]] and x not in derivation.reads()


@pytest.mark.parametrize("rule", AFFINE, ids=[r.key for r in AFFINE])
def test_affine_rules_are_derived_linear_with_an_input_jacobian_shared_by_all_samples(rule):
    tensors = derive(rule).tensors
    assert all(tensor.linear for tensor in tensors.values()) and not tensors["X"].sample_dependent
    assert tensors["X"].jvp.spec == ("...a,...bca->...bca" if "weight" in rule.params else "...abc->...abc")


def test_cli_shows_the_derived_products(capsys):
    assert main(["rules", "layer_norm"]) == 0
    out = capsys.readouterr().out
    fragments = ("normalization", "μ = Mean(x)", "J v", "Jᵀ u", "R t", "(v*y).mean(-1, keepdim=True)", "entry_affine")
    for fragment in fragments:
        assert fragment in out, fragment
    assert main(["rules"]) == 0
    assert "layer_norm" in capsys.readouterr().out


def _psd(matrix):
    return torch.linalg.eigvalsh((matrix + matrix.T) / 2).min() >= -1e-10 * max(1.0, matrix.abs().max().item())


@pytest.mark.parametrize("setting", LAYER_NORM_SETTINGS, ids=[s.id for s in LAYER_NORM_SETTINGS])
def test_positive_curvature_is_positive_semi_definite(setting):
    model = setting.build()
    x_in, t = setting.data(3)
    curvature = compiled(setting).Curvature(model)
    curvature.forward_backward(x_in, t)
    for name, p in model.named_parameters():
        eye = torch.eye(p.numel(), dtype=p.dtype).reshape(-1, *p.shape)
        for mode in ("pch-abs", "pch-clip"):
            assert _psd(curvature.block_products(mode)[name](eye).reshape(p.numel(), -1)), (mode, name)
            for flags in FLAGS:
                assert _psd(curvature.blocks(mode, *flags)[name].to_dense()), (mode, flags, name)
    hessian = curvature.block_products("hessian")
    assert any(not _psd(hessian[name](torch.eye(p.numel(), dtype=p.dtype).reshape(-1, *p.shape))
                        .reshape(p.numel(), -1)) for name, p in model.named_parameters())  # the modes matter


class PreNormResidual(nn.Module):
    """x -> fc_in -> h + fc2(tanh(fc1(LayerNorm(h)))) -> LayerNorm without bias -> fc_out: a transformer-style MLP."""

    def __init__(self):
        super().__init__()
        self.fc_in, self.fc1, self.fc2, self.fc_out = nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 4), nn.Linear(4, 3)
        self.norm1, self.norm2 = layer_norm(4), layer_norm(4, bias=False)

    def forward(self, x):
        h = self.fc_in(x)
        h = h + self.fc2(torch.tanh(self.fc1(self.norm1(h))))
        return self.fc_out(self.norm2(h))


class FunctionalNorms(nn.Module):
    """F.layer_norm with weight and bias on the input (2, 3), then torch.layer_norm with a bias only.

    torch cannot differentiate a bias-only layer_norm twice, so the references use the same function
    with the bias added after the norm (``shift_after``).
    """

    def __init__(self, shift_after=False):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(2, 3)), nn.Parameter(torch.randn(2, 3))
        self.fc = nn.Linear(6, 4)
        self.shift = nn.Parameter(torch.randn(4))
        self.out = nn.Linear(4, 3)
        self.shift_after = shift_after

    def forward(self, x):
        h = F.layer_norm(x, (2, 3), self.weight, self.bias, 1e-4).flatten(1)
        if self.shift_after:
            h = F.layer_norm(self.fc(h), [4]) + self.shift
        else:
            h = torch.layer_norm(self.fc(h), [4], None, self.shift)
        return self.out(torch.sigmoid(h))


class ConvNorm(nn.Module):
    """Conv2d -> LayerNorm over (C, H, W) of each sample -> tanh -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.fc = nn.Conv2d(1, 2, 2), layer_norm((2, 3, 3)), nn.Linear(18, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.norm(self.conv(x))).flatten(1))


MODELS = {"pre-norm-residual": (PreNormResidual, (3,)), "functional": (FunctionalNorms, (2, 3)),
          "conv-norm-chw": (ConvNorm, (1, 4, 4))}
LOSSES = {"ce-mean": nn.CrossEntropyLoss(), "mse-sum": nn.MSELoss(reduction="sum")}


def _twin(model):
    """The model for autograd references: the same function and parameters."""
    if isinstance(model, FunctionalNorms):
        twin = FunctionalNorms(shift_after=True).double()
        twin.load_state_dict(model.state_dict())
        return twin
    return model


def _setup(key, loss_key, N):
    cls, shape = MODELS[key]
    torch.manual_seed(0)
    model = cls().double()
    generator = torch.Generator().manual_seed(1)
    x_in = torch.randn(N, *shape, generator=generator, dtype=torch.float64)
    loss_fn = LOSSES[loss_key]
    t = (torch.randint(3, (N,), generator=generator) if loss_key.startswith("ce")
         else torch.randn(N, 3, generator=generator, dtype=torch.float64))
    curvature = hbpc.compile_model(model, x_in, loss_fn).Curvature(model)
    loss = curvature.forward_backward(x_in, t)
    return model, x_in, t, loss_fn, curvature, loss


def _dense(product, p):
    return product(torch.eye(p.numel(), dtype=p.dtype).reshape(-1, *p.shape)).reshape(p.numel(), -1)


@pytest.mark.parametrize("loss_key", LOSSES)
@pytest.mark.parametrize("key", MODELS)
def test_gradient_and_products_are_exact(key, loss_key):
    model, x_in, t, loss_fn, curvature, loss = _setup(key, loss_key, 3)
    expected = loss_fn(model(x_in), t)
    assert torch.allclose(loss, expected, atol=1e-12)
    grads = torch.autograd.grad(expected, list(model.parameters()))
    assert all(torch.allclose(p.grad, g, atol=1e-12) for p, g in zip(model.parameters(), grads))
    H, G = _true_hessian(_twin(model), loss_fn, x_in, t), _true_ggn(_twin(model), loss_fn, x_in, t)
    params = dict(model.named_parameters())
    for curvature_name, truth in (("hessian", H), ("ggn", G)):
        products = curvature.block_products(curvature_name)
        for name, where in parameter_slices(model).items():
            assert torch.allclose(_dense(products[name], params[name]), truth[where, where], atol=1e-10), name
    vs = [torch.randn(2, *p.shape, dtype=torch.float64) for p in model.parameters()]
    flat = torch.cat([v.reshape(2, -1) for v in vs], 1)
    for product, truth in ((curvature.hessian_vector_product, H), (curvature.ggn_vector_product, G)):
        out = torch.cat([o.reshape(2, -1) for o in product(vs)], 1)
        assert torch.allclose(out, flat @ truth.T, atol=1e-10)


@pytest.mark.parametrize("flags", FLAGS, ids=[f"avg_in={a}-avg_param={b}" for a, b in FLAGS])
@pytest.mark.parametrize("key", MODELS)
def test_hbp_blocks_are_exact_at_batch_size_one(key, flags):
    model, x_in, t, loss_fn, curvature, _ = _setup(key, "ce-mean", 1)
    H, G = _true_hessian(_twin(model), loss_fn, x_in, t), _true_ggn(_twin(model), loss_fn, x_in, t)
    for curvature_name, truth in (("hessian", H), ("ggn", G)):
        blocks = curvature.blocks(curvature_name, *flags)
        for name, where in parameter_slices(model).items():
            assert torch.allclose(blocks[name].to_dense(), truth[where, where], atol=1e-10), (curvature_name, name)


def test_parameter_names_and_ir_keep_the_models():
    model, x_in, *_ = _setup("functional", "ce-mean", 2)
    graph = hbpc.export.export(model, x_in, nn.CrossEntropyLoss())
    ops = [node.op for node in hbpc.ir.nodes(graph)]
    assert ops[:2] == ["layer_norm", "entry_affine"] and "entry_shift" in ops
    params = {p for node in hbpc.ir.nodes(graph) for p in node.params.values()}
    assert params == {"weight", "bias", "fc.weight", "fc.bias", "shift", "out.weight", "out.bias"}


def test_pch_blocks_take_the_mode_of_the_summed_matrix_residual():
    """At N = 3 with average_input_jacobian, the pch-abs block of fc_in differs from pch-clip and hessian."""
    model, x_in, t, _, curvature, _ = _setup("pre-norm-residual", "ce-mean", 3)
    dense = {mode: curvature.blocks(mode)["fc_in.weight"].to_dense() for mode in CURVATURES}
    assert _psd(dense["pch-abs"]) and _psd(dense["pch-clip"]) and _psd(dense["ggn"])
    assert not torch.allclose(dense["pch-abs"], dense["pch-clip"])
    assert not torch.allclose(dense["hessian"], dense["ggn"])


def test_fisher_mc_product_estimates_the_ggn():
    model, x_in, t, _, curvature, _ = _setup("pre-norm-residual", "ce-mean", 3)
    vs = [torch.randn(p.shape, dtype=torch.float64) for p in model.parameters()]
    exact = torch.cat([o.flatten() for o in curvature.ggn_vector_product(vs)])
    estimate = curvature.fisher_mc_vector_product(vs, 20000, torch.Generator().manual_seed(0))
    assert (torch.cat([o.flatten() for o in estimate]) - exact).norm() <= 0.05 * exact.norm()


def test_runs_in_float32():
    torch.manual_seed(0)
    model = PreNormResidual()
    x_in, t = torch.randn(4, 3), torch.randint(3, (4,))
    curvature = hbpc.compile_model(model, x_in, nn.CrossEntropyLoss()).Curvature(model)
    loss = curvature.forward_backward(x_in, t)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, nn.CrossEntropyLoss()(model(x_in), t))
    block = curvature.blocks("pch-abs", False, False)["norm1.weight"]
    assert block.to_dense().dtype == torch.float32 and torch.isfinite(block.to_dense()).all()
