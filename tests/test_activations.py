"""Every activation of the rule table, compiled and checked against autograd (float64)."""
import pytest
import torch
from torch import nn

import hbpc
from reference import ggn_block, hessian_block, recursion_blocks

ACTIVATIONS = {
    "relu": nn.ReLU(), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "elu": nn.ELU(alpha=0.7), "selu": nn.SELU(),
    "leaky_relu": nn.LeakyReLU(0.2), "softplus": nn.Softplus(beta=2.0), "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(), "mish": nn.Mish(), "logsigmoid": nn.LogSigmoid(),
    "softsign": nn.Softsign(), "hardtanh": nn.Hardtanh(-0.5, 0.7),
}


class Functional(nn.Module):
    """Activations called as functions with non-default hyper-parameters."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        x = nn.functional.elu(self.fc1(x), 0.5)
        x = nn.functional.leaky_relu(self.fc2(x), negative_slope=0.3)
        return self.fc3(nn.functional.softplus(x, beta=3.0))


def _model(activation):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), activation, nn.Linear(5, 3)).double()


def _check(model, N=3):
    torch.manual_seed(1)
    x, t = torch.randn(N, 4, dtype=torch.float64) * 2, torch.randint(3, (N,))
    loss_fn = nn.CrossEntropyLoss()
    curvature = hbpc.compile_model(model, x, loss_fn).Curvature(model)
    curvature.forward_backward(x, t)
    for mode in ("hessian", "ggn", "pch-abs", "pch-clip"):
        expected = recursion_blocks(model, loss_fn, x, t, mode)
        products = curvature.block_products(mode)
        for name, p in model.named_parameters():
            basis = torch.eye(p.numel(), dtype=p.dtype).reshape(-1, *p.shape)
            assert torch.allclose(products[name](basis).reshape(p.numel(), -1), expected[name], atol=1e-9), (mode, name)
    x1, t1 = x[:1], t[:1]
    curvature.forward_backward(x1, t1)
    for mode, exact in (("hessian", hessian_block), ("ggn", ggn_block)):
        blocks = curvature.blocks(mode, False, False)
        for name, _ in model.named_parameters():
            assert torch.allclose(blocks[name].to_dense(), exact(model, loss_fn, x1, t1, name), atol=1e-9), (mode, name)


@pytest.mark.parametrize("key", ACTIVATIONS)
def test_activation_is_exact(key):
    _check(_model(ACTIVATIONS[key]))


def test_functional_activations_with_hyper_parameters():
    _check(Functional().double())
    source = hbpc.compiler.compile_source(Functional(), torch.zeros(2, 4))
    for call in ("elu(a_fc1, 0.5)", "leaky_relu(a_fc2, 0.3)", "softplus(a_leaky_relu, 3.0, 20.0)"):
        assert f"torch.nn.functional.{call}" in source


def test_saturated_activations_stay_finite():
    for key in ("sigmoid", "tanh", "softplus", "silu", "mish", "logsigmoid", "elu", "selu"):
        model = _model(ACTIVATIONS[key])
        x = torch.tensor([[800.0, -800.0, 50.0, -50.0]], dtype=torch.float64)
        curvature = hbpc.compile_model(model, x).Curvature(model)
        curvature.forward_backward(x, torch.tensor([1]))
        for block in curvature.blocks("hessian").values():
            assert torch.isfinite(block.to_dense()).all(), key
