"""The test model zoo: small chain-shaped models, BackPACK-style settings.

Every `Setting` builds a float64 model small enough for dense Hessians
(at most ~300 parameters per tensor, inputs like (2, 5, 5)). Together the
settings cover every op of the compiler core, as modules and in functional or
method form, both losses and both reductions. Parametrize tests with

    @pytest.mark.parametrize("setting", SETTINGS, ids=IDS)

Shapes: a setting's input is `(N, *input_shape)`, its output `(N, num_classes)`;
targets are class indices `(N,)` for cross-entropy and `(N, num_classes)` for MSE.
"""

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Setting:
    """One test model: architecture, input shape, loss and data.

    `layers()` returns the modules of the chain; `build()` wraps them in a
    seeded float64 `nn.Sequential`. `loss` is "cross_entropy" or "mse".
    """

    id: str
    layers: Callable[[], list[nn.Module]]
    input_shape: tuple[int, ...]
    num_classes: int
    loss: str = "cross_entropy"
    reduction: str = "mean"
    seed: int = 0

    def build(self) -> nn.Sequential:
        """The model, float64, parameters drawn from `torch.manual_seed(seed)`."""
        torch.manual_seed(self.seed)
        return nn.Sequential(*self.layers()).double()

    def loss_fn(self) -> nn.Module:
        """`nn.CrossEntropyLoss` or `nn.MSELoss` with this setting's reduction."""
        losses = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss}
        return losses[self.loss](reduction=self.reduction)

    def data(self, batch_size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Random float64 input `(N, *input_shape)` and a matching target."""
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, *self.input_shape, generator=generator, dtype=torch.float64)
        if self.loss == "cross_entropy":
            t = torch.randint(self.num_classes, (batch_size,), generator=generator)
        else:
            t = torch.randn(batch_size, self.num_classes, generator=generator, dtype=torch.float64)
        return x, t


class FunctionalMLP(nn.Module):
    """`(N, 2, 3) -> (N, 3)`: torch.flatten, F.relu, torch.sigmoid, x.tanh(), torch.relu."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 4)
        self.fc3 = nn.Linear(4, 4)
        self.fc4 = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = torch.sigmoid(self.fc2(x))
        x = self.fc3(x).tanh()
        return self.fc4(torch.relu(x))


class FunctionalCNN(nn.Module):
    """`(N, 2, 5, 5) -> (N, 3)`: x.tanh(), x.view(x.size(0), -1), torch.sigmoid, x.sigmoid()."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc1 = nn.Linear(27, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        x = self.conv(x).tanh()
        x = x.view(x.size(0), -1)
        x = torch.sigmoid(self.fc1(x))
        return self.fc2(x).sigmoid()


class Reshape(nn.Module):
    """`(N, ...) -> (N, numel/N)` by `x.reshape(x.shape[0], -1)`."""

    def forward(self, x):
        return x.reshape(x.shape[0], -1)


class FlattenMethod(nn.Module):
    """`(N, ...) -> (N, numel/N)` by `x.flatten(1)`."""

    def forward(self, x):
        return x.flatten(1)


class MethodTanh(nn.Module):
    """Elementwise `torch.tanh(x)`."""

    def forward(self, x):
        return torch.tanh(x)


def layer_norm(*args, **kwargs) -> nn.LayerNorm:
    """`nn.LayerNorm` with its affine parameters (if any) drawn at random rather than ones and zeros."""
    module = nn.LayerNorm(*args, **kwargs)
    for p in module.parameters():
        nn.init.normal_(p, 1.0 if p is module.weight else 0.0, 0.5)
    return module


class FunctionalLayerNorm(nn.Module):
    """`(N, 5) -> (N, 3)`: `F.layer_norm` over the last dimension, without affine parameters."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.sigmoid(F.layer_norm(self.fc1(x), (4,), eps=1e-3)))


class MethodRelu(nn.Module):
    """Elementwise `x.relu()`."""

    def forward(self, x):
        return x.relu()


SETTINGS = [
    Setting(
        id="linear-sigmoid-linear_ce-mean",
        layers=lambda: [nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 3)],
        input_shape=(6,),
        num_classes=3,
    ),
    Setting(
        id="linear-tanh-linear_mse-sum",
        layers=lambda: [nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)],
        input_shape=(6,),
        num_classes=3,
        loss="mse",
        reduction="sum",
    ),
    Setting(
        id="linear-relu-linear-sigmoid-linear_ce-sum",
        layers=lambda: [nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3)],
        input_shape=(6,),
        num_classes=3,
        reduction="sum",
    ),
    Setting(
        id="flatten-linear-sigmoid-linear_mse-mean",
        layers=lambda: [nn.Flatten(), nn.Linear(12, 4), nn.Sigmoid(), nn.Linear(4, 2)],
        input_shape=(3, 2, 2),
        num_classes=2,
        loss="mse",
    ),
    Setting(
        id="conv-sigmoid-flatten-linear_ce-mean",
        layers=lambda: [nn.Conv2d(2, 3, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(27, 3)],
        input_shape=(2, 5, 5),
        num_classes=3,
    ),
    Setting(
        id="conv-stride2-pad1-tanh-flatten-linear_mse-sum",
        layers=lambda: [
            nn.Conv2d(2, 3, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(27, 3),
        ],
        input_shape=(2, 5, 5),
        num_classes=3,
        loss="mse",
        reduction="sum",
    ),
    Setting(
        id="conv-dilation2-pad1-relu-flatten-linear_ce-mean",
        layers=lambda: [
            nn.Conv2d(2, 3, 3, padding=1, dilation=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(27, 3),
        ],
        input_shape=(2, 5, 5),
        num_classes=3,
    ),
    Setting(
        id="conv-groups2-sigmoid-flatten-linear_ce-sum",
        layers=lambda: [nn.Conv2d(2, 4, 3, groups=2), nn.Sigmoid(), nn.Flatten(), nn.Linear(36, 3)],
        input_shape=(2, 5, 5),
        num_classes=3,
        reduction="sum",
    ),
    Setting(
        id="conv-nobias-stride-rect-tanh-flatten-linear_mse-mean",
        layers=lambda: [
            nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=(1, 0), bias=False),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(36, 2),
        ],
        input_shape=(2, 5, 5),
        num_classes=2,
        loss="mse",
    ),
    Setting(
        id="conv-sigmoid-maxpool2-flatten-linear_ce-mean",
        layers=lambda: [
            nn.Conv2d(2, 3, 2),
            nn.Sigmoid(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(12, 3),
        ],
        input_shape=(2, 5, 5),
        num_classes=3,
    ),
    Setting(
        id="conv-pad1-tanh-maxpool3-stride2-pad1-flatten-linear_mse-sum",
        layers=lambda: [
            nn.Conv2d(2, 3, 3, padding=1),
            nn.Tanh(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Flatten(),
            nn.Linear(27, 3),
        ],
        input_shape=(2, 5, 5),
        num_classes=3,
        loss="mse",
        reduction="sum",
    ),
    Setting(
        id="maxpool2-stride1-conv-sigmoid-flatten-linear_ce-sum",
        layers=lambda: [
            nn.MaxPool2d(2, stride=1),
            nn.Conv2d(2, 3, 2),
            nn.Sigmoid(),
            nn.Flatten(),
            nn.Linear(27, 3),
        ],
        input_shape=(2, 5, 5),
        num_classes=3,
        reduction="sum",
    ),
    Setting(
        id="conv-sigmoid-avgpool2-flatten-linear_mse-mean",
        layers=lambda: [
            nn.Conv2d(2, 3, 2),
            nn.Sigmoid(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(12, 2),
        ],
        input_shape=(2, 5, 5),
        num_classes=2,
        loss="mse",
    ),
    Setting(
        id="avgpool3-stride2-pad1-conv-tanh-flatten-linear_ce-mean",
        layers=lambda: [
            nn.AvgPool2d(3, stride=2, padding=1),
            nn.Conv2d(2, 4, 2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(16, 3),
        ],
        input_shape=(2, 5, 5),
        num_classes=3,
    ),
    Setting(
        id="conv-sigmoid-zeropad-maxpool3-stride2-flatten-linear_ce-sum",
        layers=lambda: [
            nn.Conv2d(2, 3, 2),
            nn.Sigmoid(),
            nn.ZeroPad2d((0, 1, 0, 1)),
            nn.MaxPool2d(3, stride=2),
            nn.Flatten(),
            nn.Linear(12, 3),
        ],
        input_shape=(2, 5, 5),
        num_classes=3,
        reduction="sum",
    ),
    Setting(
        id="zeropad1-conv-sigmoid-zeropad-avgpool2-flatten-linear_mse-sum",
        layers=lambda: [
            nn.ZeroPad2d(1),
            nn.Conv2d(2, 2, 3),
            nn.Sigmoid(),
            nn.ZeroPad2d((1, 0, 2, 1)),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(24, 2),
        ],
        input_shape=(2, 5, 5),
        num_classes=2,
        loss="mse",
        reduction="sum",
    ),
    Setting(
        id="c4d3-mini_ce-mean",
        layers=lambda: [
            nn.Conv2d(2, 3, 3, padding=1),
            nn.Sigmoid(),
            nn.Conv2d(3, 3, 3, padding=1),
            nn.Sigmoid(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(12, 5),
            nn.Sigmoid(),
            nn.Linear(5, 3),
        ],
        input_shape=(2, 5, 5),
        num_classes=3,
    ),
    Setting(
        id="functional-mlp_ce-mean",
        layers=lambda: [FunctionalMLP()],
        input_shape=(2, 3),
        num_classes=3,
    ),
    Setting(
        id="functional-cnn_mse-mean",
        layers=lambda: [FunctionalCNN()],
        input_shape=(2, 5, 5),
        num_classes=3,
        loss="mse",
    ),
    Setting(
        id="methods-conv-tanh-reshape-linear-relu-linear_ce-sum",
        layers=lambda: [
            nn.Conv2d(2, 3, 3),
            MethodTanh(),
            Reshape(),
            nn.Linear(27, 4),
            MethodRelu(),
            nn.Linear(4, 3),
        ],
        input_shape=(2, 5, 5),
        num_classes=3,
        reduction="sum",
    ),
    Setting(
        id="methods-conv-sigmoid-avgpool-flatten-linear_mse-sum",
        layers=lambda: [
            nn.Conv2d(2, 3, 3, padding=1),
            nn.Sigmoid(),
            nn.AvgPool2d(2, stride=1),
            FlattenMethod(),
            nn.Linear(48, 2),
        ],
        input_shape=(2, 5, 5),
        num_classes=2,
        loss="mse",
        reduction="sum",
    ),
    Setting(
        id="linear-layernorm-tanh-linear_ce-mean",
        layers=lambda: [nn.Linear(6, 4), layer_norm(4), nn.Tanh(), nn.Linear(4, 3)],
        input_shape=(6,),
        num_classes=3,
    ),
    Setting(
        id="linear-layernorm-nobias-sigmoid-linear_mse-sum",
        layers=lambda: [nn.Linear(6, 5), layer_norm(5, eps=0.1, bias=False), nn.Sigmoid(), nn.Linear(5, 3)],
        input_shape=(6,),
        num_classes=3,
        loss="mse",
        reduction="sum",
    ),
    Setting(
        id="linear-layernorm-noaffine-tanh-linear_ce-sum",
        layers=lambda: [nn.Linear(6, 4), layer_norm(4, elementwise_affine=False), nn.Tanh(), nn.Linear(4, 3)],
        input_shape=(6,),
        num_classes=3,
        reduction="sum",
    ),
    Setting(
        id="conv-layernorm2d-tanh-flatten-linear_mse-mean",
        layers=lambda: [nn.Conv2d(2, 3, 3), layer_norm((3, 3)), nn.Tanh(), nn.Flatten(), nn.Linear(27, 2)],
        input_shape=(2, 5, 5),
        num_classes=2,
        loss="mse",
    ),
    Setting(
        id="functional-layernorm_ce-mean",
        layers=lambda: [FunctionalLayerNorm()],
        input_shape=(5,),
        num_classes=3,
    ),
]

IDS = [setting.id for setting in SETTINGS]
