"""Dataset-level curvature (``data=``) in float64 against autograd on the concatenated data.

The loader has 5 batches, the last one smaller (4, 4, 4, 4, 3 samples), so a wrong weighting of the
last batch or of the mean reduction shows.
"""

import pytest
import torch

from conftest import compiled
from hbpc.linalg import (
    block_product_operator,
    blocks,
    diagonal,
    forward_backward,
    full_operator,
    hbp_block_operator,
    kronecker_factors,
    kronecker_operator,
)
from models import SETTINGS
from test_full_products import _true_ggn, _true_hessian

BY_ID = {setting.id: setting for setting in SETTINGS}
CE_MEAN, MSE_SUM = "linear-sigmoid-linear_ce-mean", "linear-tanh-linear_mse-sum"
MSE_MEAN, CONV = "flatten-linear-sigmoid-linear_mse-mean", "conv-sigmoid-maxpool2-flatten-linear_ce-mean"
SIZES = (4, 4, 4, 4, 3)


def loader(setting, sizes=SIZES):
    """``(x, t)`` of all samples and the list of batches cut from them."""
    x, t = setting.data(sum(sizes))
    return x, t, list(zip(torch.split(x, list(sizes)), torch.split(t, list(sizes))))


def bound(setting_id):
    setting = BY_ID[setting_id]
    model = setting.build()
    return setting, model, compiled(setting).Curvature(model)


def diagonal_blocks(matrix, model):
    """``{name: the diagonal block of name}`` of a full matrix over all parameters."""
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = matrix[start:start + p.numel(), start:start + p.numel()]
        start += p.numel()
    return out


@pytest.mark.parametrize("setting_id", [CE_MEAN, MSE_SUM, MSE_MEAN, CONV])
@pytest.mark.parametrize("mode", ["ggn", "hessian"])
def test_full_and_block_products_over_a_loader_equal_the_concatenated_data(setting_id, mode):
    setting, model, curvature = bound(setting_id)
    x, t, data = loader(setting)
    reference = (_true_ggn if mode == "ggn" else _true_hessian)(setting.build(), setting.loss_fn(), x, t)
    full = full_operator(curvature, mode, data=data).to_dense()
    torch.testing.assert_close(full, reference, rtol=1e-10, atol=1e-12)
    block = block_product_operator(curvature, mode, data=data)
    expected = torch.block_diag(*diagonal_blocks(reference, model).values())
    torch.testing.assert_close(block.to_dense(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("setting_id", [CE_MEAN, MSE_SUM, MSE_MEAN, CONV])
def test_kronecker_factors_over_a_loader_equal_the_concatenated_batch(setting_id):
    setting, model, curvature = bound(setting_id)
    x, t, data = loader(setting)
    dataset = kronecker_factors(curvature, data, "kflr")
    curvature.forward_backward(x, t)
    whole = curvature.kronecker_factors("kflr")
    assert list(dataset) == list(whole)
    for name, block in whole.items():
        torch.testing.assert_close(dataset[name].to_dense(), block.to_dense(), rtol=1e-10, atol=1e-12)
        if block.kronecker_factors is not None:
            for mine, theirs in zip(dataset[name].kronecker_factors, block.kronecker_factors):
                torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
    # KFLR's bias factor is the exact bias GGN block: check it against autograd as well
    ggn = diagonal_blocks(_true_ggn(setting.build(), setting.loss_fn(), x, t), model)
    bias = [name for name in dataset if name.endswith("bias")][-1]
    torch.testing.assert_close(dataset[bias].to_dense(), ggn[bias], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("setting_id", [CE_MEAN, MSE_SUM])
def test_hbp_blocks_over_a_loader_are_the_weighted_sum_of_batch_blocks(setting_id):
    setting, model, curvature = bound(setting_id)
    x, t, data = loader(setting)
    dataset = blocks(curvature, data, "pch-abs", average_input_jacobian=False)
    mean = setting.reduction == "mean"
    expected = {}
    for xb, tb in data:
        curvature.forward_backward(xb, tb)
        weight = len(tb) / len(t) if mean else 1.0
        for name, block in curvature.blocks("pch-abs", average_input_jacobian=False).items():
            expected[name] = expected.get(name, 0) + weight * block.to_dense()
    for name, matrix in expected.items():
        torch.testing.assert_close(dataset[name].to_dense(), matrix, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("setting_id", [CE_MEAN, MSE_MEAN])
def test_hbp_blocks_of_single_sample_batches_are_the_exact_ggn_blocks(setting_id):
    setting, model, curvature = bound(setting_id)
    x, t, data = loader(setting, sizes=(1,) * 6)
    operator = hbp_block_operator(curvature, "ggn", data=data)
    expected = torch.block_diag(*diagonal_blocks(_true_ggn(setting.build(), setting.loss_fn(), x, t), model).values())
    torch.testing.assert_close(operator.to_dense(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("setting_id", [CE_MEAN, MSE_SUM])
def test_gradient_over_a_loader_and_user_gradients_kept(setting_id):
    setting, model, curvature = bound(setting_id)
    x, t, data = loader(setting)
    sentinels = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinels):
        p.grad = s
    full_operator(curvature, "ggn", data=data).to_dense()
    kronecker_operator(curvature, "kflr", data=data)
    assert all(p.grad is s for p, s in zip(model.parameters(), sentinels))
    loss = forward_backward(curvature, data)
    reference = setting.build()
    expected = setting.loss_fn()(reference(x), t)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-14)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13)


def test_exact_diagonal_of_a_dataset_operator():
    setting, model, curvature = bound(CE_MEAN)
    x, t, data = loader(setting)
    G = full_operator(curvature, "ggn", data=data)
    reference = _true_ggn(setting.build(), setting.loss_fn(), x, t)
    torch.testing.assert_close(diagonal(G, chunk=7), reference.diagonal(), rtol=1e-10, atol=1e-12)


def test_shuffled_data_and_bad_batches_are_refused():
    setting, model, curvature = bound(CE_MEAN)
    x, t, data = loader(setting)

    class Shuffled:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            return iter(data if self.calls == 1 else data[::-1])

    G = full_operator(curvature, "ggn", data=Shuffled())
    v = torch.ones(G.shape[0], dtype=torch.float64)
    G @ v
    with pytest.raises(ValueError, match="turn shuffling off"):
        G @ v
    with pytest.raises(TypeError, match="iterable of \\(x, y\\) batches"):
        full_operator(curvature, "ggn", data=(x, t))
    with pytest.raises(TypeError, match="batch 0"):
        full_operator(curvature, "ggn", data=[x]) @ v
    with pytest.raises(ValueError, match="no batches"):
        full_operator(curvature, "ggn", data=[]) @ v
    with pytest.raises(ValueError, match="reduction="):
        full_operator(curvature, "ggn", data=data, reduction="avg")
