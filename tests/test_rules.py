"""Symbolic layer: each rule's derived expressions against sympy.diff, finite differences and torch."""
import numpy as np
import pytest
import sympy as sp
import torch

from exactness import loss_scope
from hbpc.derive import derive
from hbpc.derive.elementwise import hyper_values
from hbpc.derive.indexed import terms
from hbpc.rules import ELEMENTWISE, LOSSES, STRUCTURED
from hbpc.rules.spec import X, n, x, y

GRID = np.linspace(-3.0, 3.0, 25) + 0.0137  # avoid exact kinks


def _in_x(rule, expr):
    values = hyper_values(rule.hyper)
    modules = [{"Sigmoid": lambda a: 1 / (1 + np.exp(-a)), "Softplus": lambda a: np.logaddexp(0, a)}, "numpy", "scipy"]
    return sp.lambdify(x, expr.subs(y, rule.phi).subs(values), modules)


@pytest.mark.parametrize("rule", ELEMENTWISE, ids=[r.key for r in ELEMENTWISE])
def test_elementwise_derivatives_equal_sympy_diff_and_finite_differences(rule):
    derivation = derive(rule)
    d1, d2 = _in_x(rule, derivation.d1)(GRID), _in_x(rule, derivation.d2)(GRID)
    phi = sp.lambdify(x, rule.phi.subs(hyper_values(rule.hyper)), ["numpy", "scipy"])
    h = 1e-5
    assert np.allclose(d1, (phi(GRID + h) - phi(GRID - h)) / (2 * h), atol=1e-6)
    assert np.allclose(d2, (phi(GRID + h) - 2 * phi(GRID) + phi(GRID - h)) / h**2, atol=1e-3)
    second = sp.sympify(sp.diff(rule.phi, x, 2).replace(sp.DiracDelta, lambda *a: 0)).subs(hyper_values(rule.hyper))
    exact = np.broadcast_to(sp.lambdify(x, second, ["numpy", "scipy"])(GRID), GRID.shape)
    assert np.allclose(d2, exact, atol=1e-12)


@pytest.mark.parametrize("rule", ELEMENTWISE, ids=[r.key for r in ELEMENTWISE])
def test_elementwise_forward_and_code_match_torch(rule):
    derivation = derive(rule)
    t = torch.tensor(GRID, dtype=torch.float64, requires_grad=True)
    out = eval(rule.forward.format(x="t", **rule.hyper), {"torch": torch, "t": t})
    phi = sp.lambdify(x, rule.phi.subs(hyper_values(rule.hyper)), ["numpy", "scipy"])
    assert np.allclose(out.detach().numpy(), phi(GRID))
    (grad,) = torch.autograd.grad(out.sum(), t, create_graph=True)
    second = torch.autograd.grad(grad.sum(), t)[0] if grad.requires_grad else torch.zeros_like(grad)
    scope = {"torch": torch, "x": t.detach(), "y": out.detach()}
    code = derivation.code(rule.hyper)
    assert torch.allclose(torch.as_tensor(eval(code["d1"], scope), dtype=torch.float64), grad.detach())
    assert torch.allclose(torch.as_tensor(eval(code["d2"], scope), dtype=torch.float64), second)


def test_cheaper_output_form_is_used_only_where_valid():
    forms = {r.key: derive(r) for r in ELEMENTWISE}
    assert forms["sigmoid"].uses("y") and not forms["sigmoid"].uses("x")
    assert forms["tanh"].d1 == 1 - y**2
    assert forms["relu"].uses("x") and not forms["relu"].uses("y")  # Heaviside(y) would be wrong at x < 0


@pytest.mark.parametrize("rule", STRUCTURED, ids=[r.key for r in STRUCTURED])
def test_structured_rules_are_derived_linear_with_vanishing_second_derivatives(rule):
    derivation = derive(rule)
    assert set(derivation.tensors) == {"X", *rule.params}
    for name, tensor in derivation.tensors.items():
        base = X if name == "X" else rule.params[name]
        rank = len(next(iter(a for a in rule.expr.atoms(sp.Indexed) if a.base == base)).indices)
        idx = sp.symbols(f"q0:{rank}", integer=True)
        assert not terms(sp.diff(tensor.jacobian, base[idx]))


def test_a_structured_rule_that_is_not_linear_is_refused():
    """Linearity is derived, not assumed: a quadratic 'structured' rule never reaches the einsum lowering."""
    from hbpc.rules.spec import Structured, W, i, o, Σ

    square = Structured("square_map", out=(n, o), expr=Σ(W[o, i] * X[n, i] ** 2, i), params={"weight": W},
                        views=None, forward="")
    with pytest.raises(ValueError, match="not linear in X"):
        derive(square)
    bilinear = Structured("weight_squared", out=(n, o), expr=Σ(W[o, i] ** 2 * X[n, i], i), params={"weight": W},
                          views=None, forward="")
    with pytest.raises(ValueError, match="not linear in W"):
        derive(bilinear)


def test_derived_structure_facts():
    linear = derive(STRUCTURED[0]).tensors
    assert linear["weight"].block.kind == "kronecker"
    assert linear["bias"].block.kind == "dense"
    assert not linear["X"].sample_dependent and linear["weight"].sample_dependent
    conv = derive(STRUCTURED[1]).tensors
    assert conv["weight"].block.kind == "operator"
    assert conv["bias"].block.kind == "dense"
    assert linear["X"].jvp.spec == "...ab,...cb->...ca"  # J v = v Wᵀ
    assert linear["weight"].couples_input and not linear["bias"].couples_input


def test_linear_einsums_match_torch_autograd():
    derivation = derive(STRUCTURED[0])
    W, x_in = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    v, u = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    jvp = eval(derivation.tensors["X"].jvp.code({}), {"torch": torch, "W": W, "v": v})
    assert torch.allclose(jvp, v @ W.T)
    vjp = eval(derivation.tensors["X"].vjp.code({}), {"torch": torch, "W": W, "u": u})
    assert torch.allclose(vjp, u @ W)
    grad_w = eval(derivation.tensors["weight"].vjp.code({}), {"torch": torch, "X": x_in, "u": u})
    assert torch.allclose(grad_w, torch.einsum("vno,ni->voi", u, x_in))


def _loss_code(rule, z, t, v):
    code, scope = loss_scope(rule, z, t, v)
    return {key: eval(expr, scope) for key, expr in code.items()}


F = torch.nn.functional
TORCH_LOSSES = {  # ℓ summed over samples, as torch computes it
    "cross_entropy": lambda z, t: F.cross_entropy(z, t, reduction="sum"),
    "mse": lambda z, t: F.mse_loss(z, t, reduction="sum"),
    "bce_with_logits": lambda z, t: F.binary_cross_entropy_with_logits(z, t, reduction="sum"),
    "huber": lambda z, t: F.huber_loss(z, t, reduction="sum", delta=1.0),
    "smooth_l1": lambda z, t: F.smooth_l1_loss(z, t, reduction="sum", beta=1.0),
}


@pytest.mark.parametrize("rule", LOSSES, ids=[r.key for r in LOSSES])
def test_loss_derivations_match_autograd(rule):
    z = (torch.randn(4, 5, dtype=torch.float64) * 3).requires_grad_(True)
    if rule.target == "class":
        t = torch.nn.functional.one_hot(torch.randint(5, (4,)), 5).double()
        ell = TORCH_LOSSES[rule.key](z, t.argmax(1))
    else:
        t = torch.rand(4, 5, dtype=torch.float64) if rule.key == "bce_with_logits" else torch.randn(4, 5).double()
        ell = TORCH_LOSSES[rule.key](z, t)
    v = torch.randn(4, 5, dtype=torch.float64)
    out = _loss_code(rule, z.detach(), t, v)
    (grad,) = torch.autograd.grad(ell, z, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * v).sum(), z)
    assert torch.allclose(out["value"].sum(), ell)
    assert torch.allclose(out["grad"], grad)
    assert torch.allclose(out["hvp"] * torch.ones_like(v), hvp)


def test_cross_entropy_code_is_stable_for_huge_logits():
    z = torch.tensor([[1000.0, -1000.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    out = _loss_code(LOSSES[0], z, t, torch.ones_like(z))
    for value in out.values():
        assert torch.isfinite(value).all()
    assert torch.allclose(out["value"], torch.tensor([[2000.0]], dtype=torch.float64))
