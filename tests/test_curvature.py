"""Numeric layer: everything a generated module returns, in float64, against autograd references."""
import itertools

import pytest
import torch

from conftest import compiled
from models import IDS, SETTINGS
from reference import ggn_block, hbp_blocks, hessian_block, recursion_blocks

CURVATURES = ["hessian", "ggn", "pch-abs", "pch-clip"]
FLAGS = list(itertools.product([True, False], repeat=2))
FLAG_IDS = [f"avg_in={a}-avg_param={b}" for a, b in FLAGS]


def _bound(setting, N):
    model = setting.build()
    x, t = setting.data(N)
    curvature = compiled(setting).Curvature(model)
    loss = curvature.forward_backward(x, t)
    return model, x, t, curvature, loss


def _basis(p):
    return torch.eye(p.numel(), dtype=p.dtype).reshape(-1, *p.shape)


def _dense(product, p):
    return product(_basis(p)).reshape(p.numel(), p.numel())


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_loss_and_gradient_match_autograd(setting):
    model, x, t, curvature, loss = _bound(setting, 3)
    reference = setting.build()
    expected = setting.loss_fn()(reference(x), t)
    grads = torch.autograd.grad(expected, list(reference.parameters()))
    assert torch.allclose(loss, expected, atol=1e-12)
    for p, g in zip(model.parameters(), grads):
        assert torch.allclose(p.grad, g, atol=1e-12)


@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("curvature_name", CURVATURES)
@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_block_products_equal_exact_blocks(setting, curvature_name, N):
    model, x, t, curvature, _ = _bound(setting, N)
    expected = recursion_blocks(setting.build(), setting.loss_fn(), x, t, curvature_name)
    products = curvature.block_products(curvature_name)
    for name, p in model.named_parameters():
        assert torch.allclose(_dense(products[name], p), expected[name], atol=1e-10), name


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_block_products_are_the_true_hessian_and_ggn_blocks(setting):
    model, x, t, curvature, _ = _bound(setting, 3)
    for name, p in model.named_parameters():
        hessian = hessian_block(setting.build(), setting.loss_fn(), x, t, name)
        ggn = ggn_block(setting.build(), setting.loss_fn(), x, t, name)
        assert torch.allclose(_dense(curvature.block_products("hessian")[name], p), hessian, atol=1e-10)
        assert torch.allclose(_dense(curvature.block_products("ggn")[name], p), ggn, atol=1e-10)
        v = torch.randn_like(p)
        single = curvature.block_products("ggn")[name](v)
        assert single.shape == p.shape
        assert torch.allclose(single.flatten(), ggn @ v.flatten(), atol=1e-10)


@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_blocks_are_exact_at_batch_size_one(setting, flags):
    model, x, t, curvature, _ = _bound(setting, 1)
    for curvature_name, exact in (("hessian", hessian_block), ("ggn", ggn_block)):
        blocks = curvature.blocks(curvature_name, *flags)
        for name, p in model.named_parameters():
            expected = exact(setting.build(), setting.loss_fn(), x, t, name)
            assert torch.allclose(blocks[name].to_dense(), expected, atol=1e-10), (curvature_name, name)
            assert torch.allclose(_dense(blocks[name].__matmul__, p), expected, atol=1e-10)


@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("curvature_name", CURVATURES)
@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_blocks_match_per_sample_reference(setting, curvature_name, flags):
    model, x, t, curvature, _ = _bound(setting, 3)
    expected = hbp_blocks(setting.build(), setting.loss_fn(), x, t, curvature_name, *flags)
    blocks = curvature.blocks(curvature_name, *flags)
    for name, p in model.named_parameters():
        block = blocks[name]
        assert block.shape == (p.numel(), p.numel())
        assert block.param_shape == tuple(p.shape)
        assert torch.allclose(block.to_dense(), expected[name], atol=1e-10), name
        v = torch.randn(2, *p.shape, dtype=p.dtype)
        assert torch.allclose((block @ v).reshape(2, -1), v.reshape(2, -1) @ expected[name].T, atol=1e-10)


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_block_solve_inverts_damped_block(setting):
    model, x, t, curvature, _ = _bound(setting, 3)
    for name, block in curvature.blocks("ggn", True, False).items():
        p = dict(model.named_parameters())[name]
        rhs = torch.randn_like(p)
        solution = block.solve(rhs, 0.5)
        dense = block.to_dense() + 0.5 * torch.eye(p.numel(), dtype=p.dtype)
        assert torch.allclose(dense @ solution.flatten(), rhs.flatten(), atol=1e-8), name
        if block.kronecker_factors is not None:
            A, B = block.kronecker_factors
            assert torch.allclose(torch.kron(A, B), block.to_dense())
