"""Shared fixtures: compiled modules for the zoo, cached per session."""
import pytest
import torch

import hbpc

# The zoo's problems are tiny: one thread avoids contention on CI's two cores.
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite the golden generated modules")


_COMPILED = {}


def compiled(setting):
    """The generated module for a zoo setting (compiled once per session)."""
    if setting.id not in _COMPILED:
        model = setting.build()
        x, _ = setting.data(2)
        _COMPILED[setting.id] = hbpc.compile_model(model, x, setting.loss_fn())
    return _COMPILED[setting.id]


@pytest.fixture
def update_golden(request):
    return request.config.getoption("--update-golden")
