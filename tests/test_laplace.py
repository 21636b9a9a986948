"""hbpc as a laplace-torch backend: the same Laplace posterior as laplace-torch's own backends, in float64.

Reference backend: ``CurvlinopsGGN`` (same structure and exactness). For a convolution's Kronecker
factors curvlinops uses KFAC-expand (``G = Σ_{n,l} g gᵀ`` per output location) while hbpc uses
BackPACK's convention (``G = Σ_n (Σ_l g)(Σ_l g)ᵀ``, docs/curvature.md), so the CNN's ``kron`` is
compared with laplace-torch's ``BackPackGGN`` (KFLR) instead.
"""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip("laplace", reason="needs the laplace extra: python bench/install.py laplace")
from laplace import Laplace  # noqa: E402
from laplace.curvature import BackPackGGN, CurvlinopsGGN  # noqa: E402

from hbpc.errors import HbpcError  # noqa: E402
from hbpc.laplace import HBPCGGN, HBPCHessian  # noqa: E402

RTOL = 1e-7


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()


SHAPES = {"mlp": (4,), "cnn": (1, 6, 6)}
BUILD = {"mlp": mlp, "cnn": cnn}


def loader(name, likelihood, n=23, batch_size=5):
    """``n`` samples in batches of ``batch_size`` (the last one smaller)."""
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(n, *SHAPES[name], generator=generator, dtype=torch.float64)
    if likelihood == "classification":
        y = torch.randint(3, (n,), generator=generator)
    else:
        y = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    return X, DataLoader(TensorDataset(X, y), batch_size=batch_size)


def fitted(name, likelihood, structure, backend, subset="all"):
    """``(log marginal likelihood at prior precision 0.7, GLM predictive on 7 inputs)``."""
    X, data = loader(name, likelihood)
    la = Laplace(BUILD[name](), likelihood, subset_of_weights=subset, hessian_structure=structure, backend=backend)
    la.fit(data)
    lml = la.log_marginal_likelihood(torch.tensor(0.7, dtype=torch.float64))
    predictive = la(X[:7], pred_type="glm")
    parts = [predictive] if isinstance(predictive, torch.Tensor) else list(predictive)  # regression: (mean, var)
    return lml.detach(), torch.cat([part.reshape(len(part), -1) for part in parts], -1).detach()


CASES = [(name, likelihood, structure) for name in ("mlp", "cnn") for structure in ("full", "kron", "diag")
         for likelihood in ("classification", "regression") if name == "mlp" or likelihood == "classification"]


@pytest.mark.parametrize("name,likelihood,structure", CASES, ids=["-".join(case) for case in CASES])
def test_laplace_with_hbpc_equals_laplace_torch_backends(name, likelihood, structure):
    reference = BackPackGGN if (name, structure) == ("cnn", "kron") else CurvlinopsGGN
    mine, theirs = fitted(name, likelihood, structure, HBPCGGN), fitted(name, likelihood, structure, reference)
    torch.testing.assert_close(mine[0], theirs[0], rtol=RTOL, atol=0)
    torch.testing.assert_close(mine[1], theirs[1], rtol=RTOL, atol=RTOL * theirs[1].abs().max().item())


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_last_layer_laplace_the_default_subset(structure):
    mine = fitted("cnn", "classification", structure, HBPCGGN, subset="last_layer")
    theirs = fitted("cnn", "classification", structure, CurvlinopsGGN, subset="last_layer")
    torch.testing.assert_close(mine[0], theirs[0], rtol=RTOL, atol=0)
    torch.testing.assert_close(mine[1], theirs[1], rtol=RTOL, atol=RTOL)


def test_hessian_backend_full_is_the_true_hessian():
    X, data = loader("mlp", "regression")
    model = mlp()
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="full", backend=HBPCHessian)
    la.fit(data)
    y = torch.cat([batch[1] for batch in data])
    params = torch.nn.utils.parameters_to_vector(model.parameters()).detach()

    def loss(flat):
        shapes = {name: p for name, p in model.named_parameters()}
        chunks, start = {}, 0
        for key, p in shapes.items():
            chunks[key] = flat[start:start + p.numel()].reshape(p.shape)
            start += p.numel()
        out = torch.func.functional_call(model, chunks, (X,))
        return 0.5 * ((out - y) ** 2).sum()

    torch.testing.assert_close(la.H, torch.autograd.functional.hessian(loss, params), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="HBPCGGN"):
        Laplace(mlp(), "regression", subset_of_weights="all", hessian_structure="kron", backend=HBPCHessian).fit(data)


def test_gradients_kept_and_uncompilable_models_refused():
    X, data = loader("mlp", "classification")
    model = mlp()
    backend = HBPCGGN(model, "classification")
    sentinel = [torch.full_like(p, 3.0) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinel):
        p.grad = s
    backend.full(*next(iter(data)))
    assert all(p.grad is s for p, s in zip(model.parameters(), sentinel))

    class Sorted(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3).double()

        def forward(self, x):
            return torch.sort(self.linear(x), dim=-1).values

    with pytest.raises(HbpcError, match="could not compile the model for the Laplace backend"):
        HBPCGGN(Sorted(), "classification").full(*next(iter(data)))
    with pytest.raises(ValueError, match="subnetwork"):
        HBPCGGN(mlp(), "classification", subnetwork_indices=torch.arange(3))
