"""User-rule fuzzer: random sympy activations and random losses, exact against autograd in float64.

Two layers, every rule through hbpc's real derivation and printer:

* compiled: a model ``Linear → act → Linear → act → Linear`` with two random activations (user module
  classes) and a random loss, compiled and checked for loss, gradient, a Hessian and a GGN product and
  the Hessian and GGN blocks of the first weight at N = 1 (``exactness.check_exact``);
* derived: more random rules, each checked by evaluating its emitted torch code (φ itself, φ′, φ″; or
  ℓ, ∇ℓ and ∇²ℓ v) against torch.autograd on random inputs.

``HBPC_FUZZ_SCALE`` multiplies the number of rules (default 1: 300 rules).
"""
import os
import random

import pytest
import torch
from torch import nn

import hbpc
from exactness import check_exact, loss_scope
from hbpc.derive import derive
from hbpc.derive.printer import torch_code
from rule_fuzz import CLASSES, random_activation, random_loss

SCALE = float(os.environ.get("HBPC_FUZZ_SCALE", "1"))
COMPILED = max(1, int(30 * SCALE))  # modules, 3 rules each
DERIVED_ACTIVATIONS = max(1, int(150 * SCALE))
DERIVED_LOSSES = max(1, int(60 * SCALE))
RULES_PER_CASE = 10  # derived rules per test case: a failure names a small group


class _FuzzLoss(nn.Module):
    reduction = "mean"

    def __init__(self, ell):
        super().__init__()
        self.ell = ell

    def forward(self, z, target):
        return self.ell(z, target).mean()


def _activation_module(rule, reference):
    """A user module class named like the rule (its lower-cased class name is the rule key)."""
    return type(rule.key.capitalize(), (nn.Module,), {"forward": lambda self, x: reference(x)})()


@pytest.mark.parametrize("case", range(COMPILED))
def test_compiled_random_rules_are_exact(case):
    rng = random.Random(1000 + case)
    first, first_torch = random_activation(rng, f"fuzzacta{case}")
    second, second_torch = random_activation(rng, f"fuzzactb{case}")
    loss_rule, loss_torch = random_loss(rng, f"fuzzloss{case}")
    torch.manual_seed(case)
    model = nn.Sequential(nn.Linear(3, 4), _activation_module(first, first_torch), nn.Linear(4, 4),
                          _activation_module(second, second_torch), nn.Linear(4, CLASSES)).double()
    loss_fn = type(f"Fuzzloss{case}", (_FuzzLoss,), {})(loss_torch)
    generator = torch.Generator().manual_seed(case)
    x = torch.randn(3, 3, dtype=torch.float64, generator=generator)
    targets = torch.randn(3, CLASSES, dtype=torch.float64, generator=generator)
    module = hbpc.compile_model(model, x, loss_fn, rules=[first, second, loss_rule])
    check_exact(module, model, loss_fn, x, targets, "0.weight", generator)


def _check_activation(rule, reference, points):
    derivation = derive(rule)
    forward = eval(torch_code(rule.phi), {"torch": torch, "x": points})
    u = points.clone().requires_grad_(True)
    phi = reference(u)
    (d1,) = torch.autograd.grad(phi.sum(), u, create_graph=True)
    d2 = torch.autograd.grad(d1.sum(), u)[0] if d1.requires_grad else torch.zeros_like(points)
    code = derivation.code(rule.hyper)
    scope = {"torch": torch, "x": points, "y": phi.detach()}
    for name, got, want in (("φ", forward, phi), ("φ′", eval(code["d1"], scope), d1),
                            ("φ″", eval(code["d2"], scope), d2)):
        got = torch.as_tensor(got, dtype=torch.float64) * torch.ones_like(points)
        assert torch.allclose(got, want.detach(), atol=1e-10, rtol=1e-8), f"{rule.key} {name}: φ = {rule.phi}"


@pytest.mark.parametrize("group", range((DERIVED_ACTIVATIONS + RULES_PER_CASE - 1) // RULES_PER_CASE))
def test_derived_random_activations_are_exact(group):
    rng = random.Random(2000 + group)
    points = torch.linspace(-4, 4, 41, dtype=torch.float64) + 0.013
    for index in range(min(RULES_PER_CASE, DERIVED_ACTIVATIONS - group * RULES_PER_CASE)):
        _check_activation(*random_activation(rng, f"fuzzact{group}x{index}"), points)


def _check_loss(rule, reference, generator):
    z = torch.randn(4, CLASSES, dtype=torch.float64, generator=generator)
    t = torch.randn(4, CLASSES, dtype=torch.float64, generator=generator)
    v = torch.randn(2, 4, CLASSES, dtype=torch.float64, generator=generator)
    code, scope = loss_scope(rule, z, t, v)
    value, grad, hvp = (eval(code[name], scope) for name in ("value", "grad", "hvp"))
    u = z.clone().requires_grad_(True)
    ell = reference(u, t)
    (want_grad,) = torch.autograd.grad(ell.sum(), u, create_graph=True)
    want_hvp = torch.stack([torch.autograd.grad((want_grad * w).sum(), u, retain_graph=True, allow_unused=True)[0]
                            if want_grad.requires_grad else torch.zeros_like(z) for w in v])
    assert torch.allclose(torch.as_tensor(value).sum(-1) * torch.ones(4, dtype=torch.float64), ell.detach(),
                          atol=1e-10, rtol=1e-8), f"{rule.key} ℓ: {rule.ell}"
    assert torch.allclose(grad, want_grad.detach(), atol=1e-10, rtol=1e-8), f"{rule.key} ∇ℓ: {rule.ell}"
    assert torch.allclose(hvp + 0 * v, want_hvp, atol=1e-10, rtol=1e-8), f"{rule.key} ∇²ℓ v: {rule.ell}"


@pytest.mark.parametrize("group", range((DERIVED_LOSSES + RULES_PER_CASE - 1) // RULES_PER_CASE))
def test_derived_random_losses_are_exact(group):
    rng = random.Random(3000 + group)
    generator = torch.Generator().manual_seed(group)
    for index in range(min(RULES_PER_CASE, DERIVED_LOSSES - group * RULES_PER_CASE)):
        _check_loss(*random_loss(rng, f"fuzzloss{group}x{index}"), generator)


def test_the_default_profile_runs_at_least_300_rules():
    if SCALE >= 1:
        assert 3 * COMPILED + DERIVED_ACTIVATIONS + DERIVED_LOSSES >= 300
