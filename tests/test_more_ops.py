"""1D and 3D convolution and pooling, transposed convolution (issue 5), exact against autograd in float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hbpc
from reference import hbp_blocks, recursion_blocks
from exactness import assert_dense_exact


class Functional1d(nn.Module):
    """The functional forms: F.conv1d with a parameter, F.max_pool1d, F.avg_pool1d."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 2, 3) / 3)
        self.bias = nn.Parameter(torch.randn(3) / 3)
        self.fc = nn.Linear(3 * 2, 3)

    def forward(self, x):
        h = F.elu(F.conv1d(x, self.weight, self.bias, 2, 1, 1, 1))      # (3, 5)
        h = torch.sigmoid(F.max_pool1d(h, 2, 1, 0, 2))                   # (3, 3)
        h = F.avg_pool1d(h, 2, 1, padding=1)                              # (3, 4)
        return self.fc(F.max_pool1d(h, 2).flatten(1))                     # (3, 2)


def _module_model():
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2, groups=2), nn.Tanh(),   # (4, 5)
        nn.MaxPool1d(2, stride=1, padding=1), nn.Sigmoid(),                         # (4, 6)
        nn.Conv1d(4, 2, 2, bias=False), nn.Softplus(),                              # (2, 5)
        nn.AvgPool1d(3, stride=2, padding=1),                                       # (2, 3)
        nn.Flatten(), nn.Linear(6, 3))


class Functional3d(nn.Module):
    """F.conv3d with a parameter (no bias, groups), F.avg_pool3d, F.max_pool3d."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 1, 2, 1, 2) / 2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(F.conv3d(x, self.weight, None, (1, 2, 1), 1, (2, 1, 1), 2))
        h = F.avg_pool3d(h, (2, 1, 2), stride=1, padding=(0, 0, 1))
        h = torch.sigmoid(F.max_pool3d(h, (1, 2, 2), (1, 1, 2), dilation=(1, 2, 1)))
        return self.fc(h.flatten(1))


def _module_model_3d():
    return nn.Sequential(
        nn.Conv3d(2, 4, (2, 3, 2), stride=(1, 2, 1), padding=(1, 1, 0), dilation=(1, 1, 2), groups=2), nn.Tanh(),
        nn.AvgPool3d(2, stride=1, padding=1), nn.Sigmoid(),                                 # (4, 5, 4, 2)
        nn.MaxPool3d(2, stride=1),                                                          # (4, 4, 3, 1)
        nn.Conv3d(4, 2, (2, 2, 1), bias=False), nn.Flatten(), nn.Linear(24, 3))


class FunctionalTranspose(nn.Module):
    """F.conv_transpose2d with parameters, then an ordinary convolution."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 2, 2, 2) / 2)
        self.bias = nn.Parameter(torch.randn(2) / 2)
        self.conv = nn.Conv2d(2, 1, 2, stride=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.softplus(F.conv_transpose2d(x, self.weight, self.bias, 2, 1, 1))  # (2, 4, 4)
        return self.fc(torch.tanh(self.conv(h)).flatten(1))


def _transpose_model():
    return nn.Sequential(
        nn.ConvTranspose2d(4, 6, (2, 3), stride=(2, 3), padding=(1, 0), output_padding=(1, 2), dilation=(2, 1),
                           groups=2), nn.Tanh(),                                                  # (6, 4, 8)
        nn.ConvTranspose2d(6, 2, 2, padding=1, bias=False), nn.Sigmoid(),                         # (2, 3, 7)
        nn.Flatten(), nn.Linear(42, 3))


class Transpose1d(nn.Module):
    """F.conv_transpose1d with every option, then ConvTranspose1d (parameters registered in the order of use)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 2, 3) / 2)
        self.up = nn.ConvTranspose1d(4, 1, 2)
        self.fc = nn.Linear(11, 3)

    def forward(self, x):
        h = torch.tanh(F.conv_transpose1d(x, self.weight, None, 2, 1, 1, 2, 2))   # (4, 10)
        return self.fc(torch.sigmoid(self.up(h)).flatten(1))                       # (1, 11)


def _transpose_model_1d():
    return nn.Sequential(
        nn.ConvTranspose1d(2, 4, 3, stride=2, padding=1, output_padding=1, dilation=2, groups=2), nn.Tanh(),
        nn.ConvTranspose1d(4, 1, 2), nn.Sigmoid(), nn.Flatten(), nn.Linear(11, 3))


def _transpose_model_3d():
    return nn.Sequential(
        nn.ConvTranspose3d(4, 4, (2, 1, 2), stride=(2, 1, 1), padding=(1, 0, 0), output_padding=(1, 0, 0),
                           dilation=(2, 1, 1), groups=2), nn.Tanh(),                              # (4, 4, 2, 3)
        nn.ConvTranspose3d(4, 1, 2, padding=1, bias=False), nn.Flatten(), nn.Linear(6, 3))    # (1, 3, 1, 2)


MODELS = {"modules": (_module_model, (2, 9)), "functional": (Functional1d, (2, 9)),
          "modules-3d": (_module_model_3d, (2, 3, 5, 4)), "functional-3d": (Functional3d, (2, 3, 4, 3)),
          "transpose": (_transpose_model, (4, 2, 2)), "functional-transpose": (FunctionalTranspose, (2, 3, 3)),
          "transpose-1d": (_transpose_model_1d, (2, 4)), "functional-transpose-1d": (Transpose1d, (2, 4)),
          "transpose-3d": (_transpose_model_3d, (4, 2, 2, 2))}
LOSSES = {"ce-mean": nn.CrossEntropyLoss(), "mse-sum": nn.MSELoss(reduction="sum")}


def _setup(key, loss_key, N):
    build, shape = MODELS[key]
    torch.manual_seed(0)
    model = build().double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N, *shape, generator=generator, dtype=torch.float64)
    loss_fn = LOSSES[loss_key]
    t = (torch.randint(3, (N,), generator=generator) if loss_key.startswith("ce")
         else torch.randn(N, 3, generator=generator, dtype=torch.float64))
    return model, x, t, loss_fn


@pytest.mark.parametrize("loss_key", list(LOSSES))
@pytest.mark.parametrize("key", list(MODELS))
def test_ops_are_exact(key, loss_key):
    assert_dense_exact(*_setup(key, loss_key, 3))


@pytest.mark.parametrize("flags", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("curvature_name", ["hessian", "ggn", "pch-abs", "pch-clip"])
@pytest.mark.parametrize("key", ["modules", "modules-3d", "transpose", "transpose-1d", "transpose-3d"])
def test_blocks_match_per_sample_reference(key, curvature_name, flags):
    model, x, t, loss_fn = _setup(key, "ce-mean", 3)
    curvature = hbpc.compile_model(model, x, loss_fn).Curvature(model)
    curvature.forward_backward(x, t)
    expected = hbp_blocks(model, loss_fn, x, t, curvature_name, *flags)
    blocks = curvature.blocks(curvature_name, *flags)
    exact = recursion_blocks(model, loss_fn, x, t, curvature_name)
    products = curvature.block_products(curvature_name)
    for name, p in model.named_parameters():
        assert torch.allclose(blocks[name].to_dense(), expected[name], atol=1e-10), name
        basis = torch.eye(p.numel(), dtype=p.dtype).reshape(-1, *p.shape)
        assert torch.allclose(products[name](basis).reshape(p.numel(), -1), exact[name], atol=1e-10), name


def test_unsupported_options_are_refused():
    for layer in (nn.Conv1d(2, 2, 3, padding="same"), nn.ReflectionPad1d(1),
                  nn.Upsample(scale_factor=2), nn.Conv1d(2, 2, 3, padding_mode="circular")):
        model = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(3))
        model(torch.zeros(2, 2, 8))
        with pytest.raises(hbpc.HbpcError, match="supported"):
            hbpc.compile_model(model, torch.zeros(2, 2, 8), nn.CrossEntropyLoss())
