"""Parameter splitting (the paper's "parallel" modules): ``split=k`` in blocks, block_products and NewtonCG.

A split parameter keeps the diagonal sub-blocks of its curvature block over ``torch.chunk(θ, k, 0)``;
for layers whose rows map to output rows (Linear, Conv, BatchNorm) that is the parameter block
computed from the diagonal sub-block of the layer's output curvature. Exact against autograd at N = 1.
"""
import pytest
import torch

from conftest import compiled
from hbpc.optim import PAPER, NewtonCG
from models import SETTINGS
from reference import hessian_block, recursion_blocks

SPLIT_IDS = ("linear-relu-linear-sigmoid-linear_ce-sum", "linear-tanh-linear_mse-sum",
             "conv-sigmoid-maxpool2-flatten-linear_ce-mean", "conv-groups2-sigmoid-flatten-linear_ce-sum")
SPLIT_SETTINGS = [s for s in SETTINGS if s.id in SPLIT_IDS]


def _bound(setting, N):
    model = setting.build()
    x, t = setting.data(N)
    curvature = compiled(setting).Curvature(model)
    curvature.forward_backward(x, t)
    return model, x, t, curvature


def _mask(p, parts):
    """1 on the diagonal sub-blocks of vec(θ) over torch.chunk(θ, parts, 0), else 0."""
    index = torch.arange(p.shape[0]).repeat_interleave(p.numel() // p.shape[0]) if p.dim() else torch.zeros(1)
    chunk = -(-p.shape[0] // parts) if p.dim() else 1
    owner = index // chunk
    return (owner[:, None] == owner[None, :]).to(p.dtype)


def _dense(apply, p):
    return apply(torch.eye(p.numel(), dtype=p.dtype).reshape(-1, *p.shape)).reshape(p.numel(), p.numel())


@pytest.mark.parametrize("parts", [2, 3, 16])
@pytest.mark.parametrize("setting", SPLIT_SETTINGS, ids=lambda s: s.id)
def test_split_blocks_are_diagonal_sub_blocks_of_the_true_hessian_at_one_sample(setting, parts):
    model, x, t, curvature = _bound(setting, 1)
    blocks = curvature.blocks("hessian", split=parts)
    for name, p in model.named_parameters():
        expected = hessian_block(setting.build(), setting.loss_fn(), x, t, name) * _mask(p, parts)
        assert torch.allclose(blocks[name].to_dense(), expected, atol=1e-10), name
        assert torch.allclose(_dense(lambda v: blocks[name] @ v, p), expected, atol=1e-10), name


@pytest.mark.parametrize("curvature_name", ["hessian", "ggn", "pch-abs", "pch-clip"])
@pytest.mark.parametrize("setting", SPLIT_SETTINGS, ids=lambda s: s.id)
def test_split_block_products_are_diagonal_sub_blocks(setting, curvature_name):
    model, x, t, curvature = _bound(setting, 3)
    expected = recursion_blocks(setting.build(), setting.loss_fn(), x, t, curvature_name)
    products = curvature.block_products(curvature_name, split=4)
    for name, p in model.named_parameters():
        assert torch.allclose(_dense(products[name], p), expected[name] * _mask(p, 4), atol=1e-10), name
        single = torch.randn(p.shape, dtype=p.dtype)
        assert products[name](single).shape == p.shape
        for start, stop, part in getattr(products[name], "parts", []):
            rest = p.numel() // p.shape[0]
            sub = expected[name][start * rest:stop * rest, start * rest:stop * rest]
            basis = torch.eye(single[start:stop].numel(), dtype=p.dtype).reshape(-1, *single[start:stop].shape)
            assert torch.allclose(part(basis).reshape(len(basis), -1),
                                  sub.reshape(len(basis), len(basis)), atol=1e-10)


def test_chunks_follow_torch_chunk():
    setting = SPLIT_SETTINGS[0]
    model, x, t, curvature = _bound(setting, 2)
    for parts in (1, 2, 3, 5, 100):
        blocks = curvature.blocks("ggn", split=parts)
        for name, p in model.named_parameters():
            expected = [len(chunk) for chunk in torch.chunk(torch.arange(p.shape[0]), parts)]
            found = [stop - start for start, stop, _ in getattr(blocks[name], "parts", [(0, p.shape[0], None)])]
            assert found == expected, (name, parts)


@pytest.mark.parametrize("average", [True, False])
def test_split_kronecker_blocks_stay_kronecker_and_solve_per_chunk(average):
    setting = SPLIT_SETTINGS[0]
    model, x, t, curvature = _bound(setting, 3)
    blocks = curvature.blocks("pch-abs", average, average, split=2)
    for name, p in model.named_parameters():
        block = blocks[name]
        rhs = torch.randn(p.shape, dtype=p.dtype)
        solved = block.solve(rhs, 0.3)
        dense = block.to_dense() + 0.3 * torch.eye(p.numel(), dtype=p.dtype)
        assert torch.allclose(dense @ solved.reshape(-1), rhs.reshape(-1), atol=1e-9), name
        if name.endswith("weight") and p.dim() == 2:
            assert all(part.kronecker_factors is not None for _, _, part in block.parts), name


def test_split_is_validated():
    setting = SPLIT_SETTINGS[0]
    model, x, t, curvature = _bound(setting, 2)
    for bad in (0, 1.5, "2"):
        with pytest.raises(ValueError, match="split must be a positive int"):
            curvature.blocks("ggn", split=bad)
        with pytest.raises(ValueError, match="split must be a positive int"):
            curvature.block_products("ggn", split=bad)
    with pytest.raises(ValueError, match="split needs source"):
        NewtonCG(model.parameters(), curvature, source="full", curvature="ggn", split=2)


@pytest.mark.parametrize("source", ["blocks", "block_products"])
def test_newton_cg_solves_each_chunk_separately(source):
    setting = SPLIT_SETTINGS[0]
    model, x, t, curvature = _bound(setting, 4)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = NewtonCG(model.parameters(), curvature, lr=1.0, alpha=0.1, cg_tol=1e-12, cg_maxiter=500,
                         source=source, curvature="ggn", split=2, **dict(PAPER, max_step=None))
    operators = (curvature.blocks("ggn", split=2) if source == "blocks" else curvature.block_products("ggn", split=2))
    damped = {name: 0.9 * _dense((lambda v, o=operators[name]: o @ v) if source == "blocks" else operators[name], p)
              + 0.1 * torch.eye(p.numel(), dtype=p.dtype) for name, p in model.named_parameters()}
    optimizer.step()  # products read the parameters: the matrices above are from before the step
    for name, p in model.named_parameters():
        step = p.detach() - before[name]
        assert torch.allclose(damped[name] @ step.reshape(-1), -grads[name].reshape(-1), atol=1e-8), name
    keys = set(optimizer.last_stats.params)
    assert any("[" in key for key in keys)
