"""The example model files follow the model.py contract (design.md §4)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

MODELS = Path(__file__).parents[1] / "examples" / "models"

PARAMETERS = {
    "fcnn_cifar10": 3_846_810,
    "c4d3_cifar10": 1_099_226,
    "deepobs_3c3d_cifar10": 895_210,
    "fcnn_fashion_mnist": 1_503_898,
    "c4d3_fashion_mnist": 853_178,
    "deepobs_3c3d_fashion_mnist": 892_010,
    "mlp_fashion_mnist": 109_386,
    "cnn_fashion_mnist": 5_994,
    "logreg_fashion_mnist": 7_850,
    "cnn1d_fashion_mnist": 2_954,
    "gpt_char": 30_624,  # the output layer shares the embedding
    "vit": 11_114,
}
OUTPUTS = {"gpt_char": (97, 64)}  # logits (N, C, T) over the tokens; the others classify into 10


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, MODELS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_file_is_listed():
    assert sorted(path.stem for path in MODELS.glob("*.py")) == sorted(PARAMETERS)


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_example_model(name):
    source = load(name)
    model = source.build_model()
    assert isinstance(model, nn.Module)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]
    assert isinstance(source.loss_fn, (nn.CrossEntropyLoss, nn.MSELoss))

    x = source.example_input
    assert torch.equal(x, torch.zeros_like(x))
    output = OUTPUTS.get(name, (10,))
    assert model(x).shape == (x.shape[0], *output)
    other = torch.randint(output[0], (5, *x.shape[1:])) if x.dtype == torch.long else torch.randn(5, *x.shape[1:])
    assert model(other).shape == (5, *output)


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_example_model_is_deterministic(name):
    first, second = load(name).build_model(), load(name).build_model()
    for p, q in zip(first.parameters(), second.parameters()):
        assert torch.equal(p, q)
