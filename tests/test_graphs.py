"""Graphs, not chains: residuals, scaling, cat, reused modules and tied weights, against autograd (float64)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import hbpc
from test_full_products import _true_ggn, _true_hessian, parameter_slices


class Residual(nn.Module):
    """x -> fc_in -> tanh -> [h + 0.5 * fc2(sigmoid(fc1(h)))] -> relu... -> fc_out: a ResNet-style block."""

    def __init__(self):
        super().__init__()
        self.fc_in, self.fc1, self.fc2, self.fc_out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.fc_in(x))
        h = h + 0.5 * self.fc2(torch.sigmoid(self.fc1(h)))
        return self.fc_out(F.softplus(h) / 2 - 1)


class ConvResidual(nn.Module):
    """A convolutional residual block with a shared activation module used twice."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 2, 3, padding=1)
        self.conv1, self.conv2 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.act = nn.Tanh()
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        h = self.act(self.conv0(x))
        h = self.act(h + self.conv2(self.act(self.conv1(h))))
        return self.fc(h.flatten(1))


class Concat(nn.Module):
    """Two branches concatenated along features."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 2), nn.Linear(3, 4), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.cat([torch.sigmoid(self.a(x)), torch.tanh(self.b(x))], dim=1))


class Tied(nn.Module):
    """The same Linear applied twice (tied weights)."""

    def __init__(self):
        super().__init__()
        self.fc_in, self.shared, self.fc_out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.fc_in(x))
        h = torch.sigmoid(self.shared(h))
        h = torch.sigmoid(self.shared(h))
        return self.fc_out(h)


MODELS = {"residual": (Residual, (3,)), "conv-residual": (ConvResidual, (1, 4, 4)), "concat": (Concat, (3,)),
          "tied": (Tied, (3,))}
LOSSES = {"ce-mean": nn.CrossEntropyLoss(), "mse-sum": nn.MSELoss(reduction="sum")}


def _setup(key, loss_key, N):
    cls, shape = MODELS[key]
    torch.manual_seed(0)
    model = cls().double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N, *shape, generator=generator, dtype=torch.float64)
    loss_fn = LOSSES[loss_key]
    t = (torch.randint(3, (N,), generator=generator) if loss_key.startswith("ce")
         else torch.randn(N, 3, generator=generator, dtype=torch.float64))
    curvature = hbpc.compile_model(model, x, loss_fn).Curvature(model)
    curvature.forward_backward(x, t)
    return model, x, t, loss_fn, curvature


@pytest.mark.parametrize("loss_key", LOSSES)
@pytest.mark.parametrize("key", MODELS)
def test_gradient_and_products_are_exact_on_graphs(key, loss_key):
    model, x, t, loss_fn, curvature = _setup(key, loss_key, 3)
    grads = torch.autograd.grad(loss_fn(model(x), t), list(model.parameters()))
    assert all(torch.allclose(p.grad, 2 * g) or torch.allclose(p.grad, g) for p, g in zip(model.parameters(), grads))
    H, G = _true_hessian(model, loss_fn, x, t), _true_ggn(model, loss_fn, x, t)
    for curvature_name, truth in (("hessian", H), ("ggn", G)):
        products = curvature.block_products(curvature_name)
        for name, where in parameter_slices(model).items():
            p = dict(model.named_parameters())[name]
            basis = torch.eye(p.numel(), dtype=p.dtype).reshape(-1, *p.shape)
            block = products[name](basis).reshape(p.numel(), -1)
            assert torch.allclose(block, truth[where, where], atol=1e-10), (curvature_name, name)
    shapes = [p.shape for p in model.parameters()]
    vs = [torch.randn(2, *s, dtype=torch.float64) for s in shapes]
    flat = torch.cat([v.reshape(2, -1) for v in vs], 1)
    for product, truth in ((curvature.hessian_vector_product, H), (curvature.ggn_vector_product, G)):
        out = torch.cat([o.reshape(2, -1) for o in product(vs)], 1)
        assert torch.allclose(out, flat @ truth.T, atol=1e-10)


@pytest.mark.parametrize("flags", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("key", ["residual", "conv-residual", "concat"])
def test_hbp_blocks_are_exact_at_batch_size_one_on_graphs(key, flags):
    model, x, t, loss_fn, curvature = _setup(key, "ce-mean", 1)
    H, G = _true_hessian(model, loss_fn, x, t), _true_ggn(model, loss_fn, x, t)
    for curvature_name, truth in (("hessian", H), ("ggn", G)):
        blocks = curvature.blocks(curvature_name, *flags)
        for name, where in parameter_slices(model).items():
            assert torch.allclose(blocks[name].to_dense(), truth[where, where], atol=1e-10), (curvature_name, name)


def test_tied_weights_sum_the_per_use_blocks():
    model, x, t, loss_fn, curvature = _setup("tied", "ce-mean", 1)
    G = _true_ggn(model, loss_fn, x, t)
    blocks = curvature.blocks("ggn")
    where = parameter_slices(model)["shared.weight"]
    dense = blocks["shared.weight"].to_dense()
    assert type(blocks["shared.weight"]).__name__ == "SumBlock"
    assert torch.allclose(dense, dense.T)
    assert not torch.allclose(dense, G[where, where])  # cross-use terms J_1ᵀ H J_2 are not in HBP blocks
    exact = curvature.block_products("ggn")["shared.weight"]
    basis = torch.eye(16, dtype=torch.float64).reshape(16, 4, 4)
    assert torch.allclose(exact(basis).reshape(16, 16), G[where, where], atol=1e-10)


def test_residual_block_generated_code_reads_like_the_model():
    source = hbpc.compiler.compile_source(Residual(), torch.zeros(2, 3))
    assert "a_add = a_tanh + a_mul" in source
    assert "a_mul = a_fc2 * 0.5" in source


def test_eval_mode_dropout_identity_and_adaptive_pooling_compile_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Dropout(0.3), nn.Identity(), nn.Sigmoid(),
                          nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(8, 3)).double().eval()
    x, t = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 2, 1])
    loss_fn = nn.CrossEntropyLoss()
    curvature = hbpc.compile_model(model, x, loss_fn).Curvature(model)
    curvature.forward_backward(x, t)
    H = _true_hessian(model, loss_fn, x, t)
    shapes = [p.shape for p in model.parameters()]
    vs = [torch.randn(*s, dtype=torch.float64) for s in shapes]
    out = torch.cat([o.flatten() for o in curvature.hessian_vector_product(vs)])
    assert torch.allclose(out, H @ torch.cat([v.flatten() for v in vs]), atol=1e-10)


def test_training_mode_dropout_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 2)).train()
    with pytest.raises(hbpc.HbpcError, match="dropout in training mode is random.*call model.eval"):
        hbpc.compile_model(model, torch.zeros(2, 3))


@pytest.mark.parametrize("dims", [1, 2])
def test_eval_mode_batch_norm_is_exact(dims):
    torch.manual_seed(0)
    if dims == 2:
        layers = [nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3)]
        x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    else:
        layers = [nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Sigmoid(), nn.Linear(5, 3)]
        x = torch.randn(3, 4, dtype=torch.float64)
    model = nn.Sequential(*layers).double()
    model.train()
    for _ in range(3):
        model(torch.randn(8, *x.shape[1:], dtype=torch.float64))  # non-trivial running statistics
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    model.eval()
    t, loss_fn = torch.tensor([0, 2, 1]), nn.CrossEntropyLoss()
    curvature = hbpc.compile_model(model, x, loss_fn).Curvature(model)
    curvature.forward_backward(x, t)
    H, G = _true_hessian(model, loss_fn, x, t), _true_ggn(model, loss_fn, x, t)
    vs = [torch.randn(*p.shape, dtype=torch.float64) for p in model.parameters()]
    flat = torch.cat([v.flatten() for v in vs])
    for product, truth in ((curvature.hessian_vector_product, H), (curvature.ggn_vector_product, G)):
        assert torch.allclose(torch.cat([o.flatten() for o in product(vs)]), truth @ flat, atol=1e-10)
    curvature.forward_backward(x[:1], t[:1])
    H1 = _true_hessian(model, loss_fn, x[:1], t[:1])
    blocks = curvature.blocks("hessian", False, False)
    for name, where in parameter_slices(model).items():
        assert torch.allclose(blocks[name].to_dense(), H1[where, where], atol=1e-10), name


def test_training_mode_batch_norm_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    with pytest.raises(hbpc.HbpcError, match="couples the samples; call model.eval"):
        hbpc.compile_model(model, torch.zeros(2, 3))
