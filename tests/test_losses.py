"""Every loss of the rule table, with its options, against autograd (float64)."""
import pytest
import torch
from torch import nn

import hbpc
from test_full_products import _true_ggn, _true_hessian, parameter_slices

LOSSES = {
    "ce-mean": (nn.CrossEntropyLoss(), "class"), "ce-sum": (nn.CrossEntropyLoss(reduction="sum"), "class"),
    "ce-label-smoothing": (nn.CrossEntropyLoss(label_smoothing=0.2), "class"),
    "mse-mean": (nn.MSELoss(), "dense"), "mse-sum": (nn.MSELoss(reduction="sum"), "dense"),
    "bce-with-logits": (nn.BCEWithLogitsLoss(), "binary"),
    "bce-with-logits-sum": (nn.BCEWithLogitsLoss(reduction="sum"), "binary"),
    "huber": (nn.HuberLoss(delta=0.7), "dense"), "smooth-l1": (nn.SmoothL1Loss(beta=0.5, reduction="sum"), "dense"),
    "nll-after-log-softmax": (nn.NLLLoss(), "class"),
}


def _setup(key, N):
    loss_fn, kind = LOSSES[key]
    torch.manual_seed(0)
    layers = [nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)]
    if key.startswith("nll"):
        layers.append(nn.LogSoftmax(dim=1))
    model = nn.Sequential(*layers).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N, 4, generator=generator, dtype=torch.float64) * 2
    if kind == "class":
        t = torch.randint(3, (N,), generator=generator)
    elif kind == "binary":
        t = torch.rand(N, 3, generator=generator, dtype=torch.float64)
    else:
        t = torch.randn(N, 3, generator=generator, dtype=torch.float64) * 2
    curvature = hbpc.compile_model(model, x, loss_fn).Curvature(model)
    return model, x, t, loss_fn, curvature


@pytest.mark.parametrize("key", LOSSES)
def test_loss_gradient_and_curvature_are_exact(key):
    model, x, t, loss_fn, curvature = _setup(key, 3)
    loss = curvature.forward_backward(x, t)
    expected = loss_fn(model(x), t)
    assert torch.allclose(loss, expected, atol=1e-12)
    grads = torch.autograd.grad(expected, list(model.parameters()))
    assert all(torch.allclose(p.grad, g, atol=1e-12) for p, g in zip(model.parameters(), grads))
    H = _true_hessian(model, loss_fn, x, t)
    # NLL after log_softmax is compiled as cross-entropy of the logits: its GGN linearizes up to the logits
    G = (_true_ggn(model[:-1], nn.CrossEntropyLoss(), x, t) if key.startswith("nll")
         else _true_ggn(model, loss_fn, x, t))
    shapes = [p.shape for p in model.parameters()]
    vs = [torch.randn(3, *s, dtype=torch.float64) for s in shapes]
    flat = torch.cat([v.reshape(3, -1) for v in vs], 1)
    for product, truth in ((curvature.hessian_vector_product, H), (curvature.ggn_vector_product, G)):
        assert torch.allclose(torch.cat([o.reshape(3, -1) for o in product(vs)], 1), flat @ truth.T, atol=1e-10)
    params = dict(model.named_parameters())
    for name, where in parameter_slices(model).items():
        p = params[name]
        basis = torch.eye(p.numel(), dtype=p.dtype).reshape(-1, *p.shape)
        block = curvature.block_products("hessian")[name](basis).reshape(p.numel(), -1)
        assert torch.allclose(block, H[where, where], atol=1e-10), name


@pytest.mark.parametrize("key", LOSSES)
def test_hbp_blocks_are_exact_at_batch_size_one(key):
    model, x, t, loss_fn, curvature = _setup(key, 1)
    curvature.forward_backward(x, t)
    H = _true_hessian(model, loss_fn, x, t)
    blocks = curvature.blocks("hessian")
    for name, where in parameter_slices(model).items():
        assert torch.allclose(blocks[name].to_dense(), H[where, where], atol=1e-10), name


def test_bce_with_logits_is_stable_for_huge_logits():
    model = nn.Linear(2, 2).double()
    with torch.no_grad():
        model.weight.fill_(500.0)
    curvature = hbpc.compile_model(model, torch.zeros(1, 2, dtype=torch.float64), nn.BCEWithLogitsLoss()).Curvature(model)
    loss = curvature.forward_backward(torch.tensor([[3.0, -4.0]], dtype=torch.float64), torch.tensor([[1.0, 0.0]]).double())
    assert torch.isfinite(loss)
    assert all(torch.isfinite(b.to_dense()).all() for b in curvature.blocks("hessian").values())


def test_nll_needs_a_final_log_softmax():
    with pytest.raises(hbpc.HbpcError, match="NLLLoss is supported only after a final log_softmax"):
        hbpc.compile_model(nn.Linear(3, 2), torch.zeros(2, 3), nn.NLLLoss())
