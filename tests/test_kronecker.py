"""The KFAC family (``kronecker_factors``) and the K-FAC optimizer, in float64.

Theory fixes where the Kronecker products are exact: at N = 1, KFLR's and KFRA's ``G ⊗ A`` is a
Linear weight's GGN block (the backpropagated root, resp. recursion, is exact for one sample); in a
deep linear network with MSE every per-sample output Hessian is the same, so both equal the GGN
block for any N; a bias factor ``G`` from exact roots is the bias' GGN block for any N.
KFAC's sampled factors estimate KFLR's. BackPACK 1.7.1 (bench extra) computes the same conventions.
"""
import copy
import importlib.util

import pytest
import torch
from torch import nn

import hbpc
from hbpc.optim import KFAC

F64 = dict(dtype=torch.float64)


def mlp():
    return nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Sigmoid(), nn.Conv2d(3, 2, 2, stride=2), nn.Sigmoid(),
                         nn.Flatten(), nn.Linear(8, 3))


def cnn1d():
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3, bias=False))


def deep_linear():
    return nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(3, 2))


MODELS = {"mlp": (mlp, (6,), 3), "cnn": (cnn, (2, 4, 4), 3), "cnn1d": (cnn1d, (2, 6), 3),
          "deep_linear": (deep_linear, (4,), 2)}


def bound(key, N, loss_fn=None, seed=0):
    build, shape, classes = MODELS[key]
    torch.manual_seed(seed)
    model = build().double()
    x = torch.randn(N, *shape, **F64)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    t = torch.randint(classes, (N,)) if isinstance(loss_fn, nn.CrossEntropyLoss) else torch.randn(N, classes, **F64)
    curvature = hbpc.compile_model(model, x, loss_fn).Curvature(model)
    curvature.forward_backward(x, t)
    return model, curvature, x, t, loss_fn


def ggn_blocks(model, curvature):
    products = curvature.block_products("ggn")
    dense = {}
    for name, p in model.named_parameters():
        basis = torch.eye(p.numel(), **F64).reshape(-1, *p.shape)
        dense[name] = products[name](basis).reshape(p.numel(), p.numel())
    return dense


@pytest.mark.parametrize("kind", ["kflr", "kfra"])
@pytest.mark.parametrize("key", ["mlp", "deep_linear"])
def test_linear_layers_are_exact_at_one_sample(key, kind):
    model, curvature, *_ = bound(key, 1)
    exact = ggn_blocks(model, curvature)
    factors = curvature.kronecker_factors(kind)
    assert set(factors) == {name for name, _ in model.named_parameters()}
    for name, block in factors.items():
        assert torch.allclose(block.to_dense(), exact[name], atol=1e-12), name


@pytest.mark.parametrize("kind", ["kflr", "kfra"])
def test_deep_linear_network_with_mse_is_exact_for_any_batch(kind):
    model, curvature, *_ = bound("deep_linear", 5, nn.MSELoss())
    exact = ggn_blocks(model, curvature)
    for name, block in curvature.kronecker_factors(kind).items():
        assert torch.allclose(block.to_dense(), exact[name], atol=1e-12), name


@pytest.mark.parametrize("key", ["mlp", "cnn"])
def test_kflr_bias_factor_is_the_bias_ggn_block(key):
    model, curvature, *_ = bound(key, 4)
    exact = ggn_blocks(model, curvature)
    factors = curvature.kronecker_factors("kflr")
    for name in exact:
        if name.endswith("bias"):
            assert torch.allclose(factors[name].to_dense(), exact[name], atol=1e-12), name


def test_kflr_differs_from_the_ggn_where_theory_says_it_may():
    model, curvature, *_ = bound("mlp", 4)
    exact = ggn_blocks(model, curvature)
    approximation = curvature.kronecker_factors("kflr")["0.weight"].to_dense()
    assert not torch.allclose(approximation, exact["0.weight"], atol=1e-6)


@pytest.mark.parametrize("key", ["mlp", "cnn"])
def test_kfac_samples_estimate_kflr(key):
    model, curvature, *_ = bound(key, 3)
    exact = curvature.kronecker_factors("kflr")
    generator = torch.Generator().manual_seed(0)
    estimate = curvature.kronecker_factors("kfac", samples=40000, generator=generator)
    few = curvature.kronecker_factors("kfac", samples=2, generator=torch.Generator().manual_seed(1))
    for name, block in exact.items():
        scale = block.to_dense().abs().max()
        error = (estimate[name].to_dense() - block.to_dense()).abs().max()
        assert error < 0.05 * scale, name
        assert (few[name].to_dense() - block.to_dense()).abs().max() > error, name


def test_factors_are_kronecker_blocks_with_shapes():
    model, curvature, *_ = bound("cnn", 2)
    factors = curvature.kronecker_factors("kflr")
    G, A = factors["0.weight"].kronecker_factors
    assert G.shape == (3, 3) and A.shape == (2 * 3 * 3, 2 * 3 * 3)
    assert factors["0.bias"].to_dense().shape == (3, 3)
    assert curvature.factored_parameters == ("0.weight", "0.bias", "2.weight", "2.bias", "5.weight", "5.bias")


def test_kfac_needs_a_softmax_likelihood_and_kinds_are_checked():
    _, curvature, *_ = bound("deep_linear", 2, nn.MSELoss())
    with pytest.raises(ValueError, match="kind='kfac' samples labels from a softmax likelihood"):
        curvature.kronecker_factors("kfac")
    with pytest.raises(ValueError, match="kind must be one of"):
        curvature.kronecker_factors("kfc")


def test_layers_without_factors_are_left_out_and_trained_plainly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3).eval(), nn.Tanh(), nn.Linear(3, 2)).double()
    x, t = torch.randn(5, 4, **F64), torch.randint(2, (5,))
    curvature = hbpc.compile_model(model, x, nn.CrossEntropyLoss()).Curvature(model)
    curvature.forward_backward(x, t)
    assert set(curvature.kronecker_factors("kflr")) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    optimizer = KFAC(model.parameters(), curvature)
    assert optimizer.unpreconditioned == ["1.bias", "1.weight"]


@pytest.mark.skipif(importlib.util.find_spec("backpack") is None, reason="BackPACK comes with the bench extra")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["kflr", "kfra", "kfac"])
@pytest.mark.parametrize("key", ["mlp", "cnn", "cnn1d"])
def test_factors_match_backpack(key, kind):
    import backpack
    from backpack.extensions import KFAC as BackpackKFAC, KFLR, KFRA

    model, curvature, x, t, loss_fn = bound(key, 3)
    samples = 40000 if kind == "kfac" else 1
    ours = curvature.kronecker_factors(kind, samples=samples, generator=torch.Generator().manual_seed(0))
    extension = {"kflr": KFLR(), "kfra": KFRA(), "kfac": BackpackKFAC(mc_samples=samples)}[kind]
    extended = backpack.extend(copy.deepcopy(model))
    loss = backpack.extend(copy.deepcopy(loss_fn))(extended(x), t)
    with backpack.backpack(extension):
        loss.backward()
    for name, p in extended.named_parameters():
        factors = [f.contiguous() for f in getattr(p, kind)]
        theirs = factors[0] if len(factors) == 1 else torch.kron(*factors)
        tolerance = 0.05 * theirs.abs().max() if kind == "kfac" else 1e-12
        assert (ours[name].to_dense() - theirs).abs().max() <= tolerance, name


def test_kfac_optimizer_trains_and_follows_its_intervals():
    model, curvature, *_ = bound("mlp", 2)
    torch.manual_seed(3)
    x = torch.randn(64, 6, **F64)
    t = (x[:, :3] * torch.tensor([1.0, 2.0, -1.0], **F64)).argmax(1)  # learnable labels
    optimizer = KFAC(model.parameters(), curvature, lr=0.5, momentum=0.5, damping=0.1, kl_clip=1e-2, kind="kflr",
                     factor_decay=0.5, factor_interval=2, inverse_interval=3, step_size="fixed",
                     relative_damping=False, max_change=None)  # the paper's K-FAC
    losses, factor_updates = [], 0
    for _ in range(30):
        losses.append(float(curvature.forward_backward(x, t)))
        before = {name: [f.clone() for f in fs] for name, fs in optimizer.factors.items()}
        optimizer.step()
        changed = any(not torch.equal(f, before[name][0]) for name, (f, *_) in optimizer.factors.items()
                      if name in before)
        factor_updates += changed or not before
    assert factor_updates == 15  # steps 0, 2, 4, ...
    assert losses[-1] < 0.5 * losses[0]


def test_kfac_direction_is_the_damped_kronecker_solve():
    model, curvature, *_ = bound("mlp", 4)
    optimizer = KFAC(model.parameters(), curvature, damping=0.1, factor_decay=0.0, relative_damping=False)
    optimizer.update_factors()
    optimizer.update_inverses()
    p = model[2].weight
    G, A = optimizer.factors["2.weight"]
    expected = torch.linalg.solve(torch.kron(G, A) + 0.1 * torch.eye(p.numel(), **F64), p.grad.reshape(-1))
    assert torch.allclose(optimizer.direction("2.weight", p.grad, 0.1).reshape(-1), expected, atol=1e-10)


def test_kfac_relative_damping_is_factored_in_each_factors_own_scale():
    """Relative: (G + √γ ḡ I)⁻¹ ∇W (A + √γ ā I)⁻¹ and (G + γ ḡ I)⁻¹ ∇b, ḡ and ā the mean eigenvalues; scale-free."""
    model, curvature, *_ = bound("mlp", 4)
    optimizer = KFAC(model.parameters(), curvature, damping=0.01, factor_decay=0.0)
    optimizer.update_factors()
    optimizer.update_inverses()
    G, A = optimizer.factors["2.weight"]
    eye = lambda F, gamma: gamma * torch.trace(F) / len(F) * torch.eye(len(F), **F64)  # noqa: E731
    damped = torch.kron(G + eye(G, 0.1), A + eye(A, 0.1))
    W, b = model[2].weight, model[2].bias
    expected = torch.linalg.solve(damped, W.grad.reshape(-1))
    assert torch.allclose(optimizer.direction("2.weight", W.grad, 0.01).reshape(-1), expected, atol=1e-10)
    assert torch.allclose(optimizer.direction("2.bias", b.grad, 0.01), torch.linalg.solve(G + eye(G, 0.01), b.grad))
    assert optimizer.model_damping("2.weight", 0.01) == pytest.approx(0.01 * float(torch.trace(G) * torch.trace(A))
                                                                      / (len(G) * len(A)))
    before = optimizer.direction("2.weight", W.grad, 0.01)
    optimizer.factors = {name: [1e-6 * F for F in fs] for name, fs in optimizer.factors.items()}
    optimizer.update_inverses()
    assert torch.allclose(1e-12 * optimizer.direction("2.weight", W.grad, 0.01), before, rtol=1e-8)


def test_kfac_rejects_bad_settings():
    _, curvature, *_ = bound("mlp", 2)
    with pytest.raises(ValueError, match="kind='kfc' is not one of"):
        KFAC(curvature.model.parameters(), curvature, kind="kfc")
    with pytest.raises(ValueError, match="damping=0 is out of range"):
        KFAC(curvature.model.parameters(), curvature, damping=0)
    with pytest.raises(ValueError, match="step_size='kl' is not one of"):
        KFAC(curvature.model.parameters(), curvature, step_size="kl")


def test_kfac_running_factors_start_at_the_first_batch():
    model, curvature, *_ = bound("mlp", 4)
    optimizer = KFAC(model.parameters(), curvature, kind="kflr", factor_decay=0.95)
    optimizer.update_factors()
    G, A = curvature.kronecker_factors("kflr")["2.weight"].kronecker_factors
    assert [torch.equal(f, g) for f, g in zip(optimizer.factors["2.weight"], (G, A))] == [True, True]
    optimizer.update_factors()
    running_G, _ = optimizer.factors["2.weight"]
    assert torch.allclose(running_G, G)  # same batch: the average of equal factors


def test_kfac_quadratic_step_minimises_the_exact_ggn_model_along_direction_and_previous_update():
    model, curvature, x, t, _ = bound("mlp", 8)
    optimizer = KFAC(model.parameters(), curvature, kind="kflr", damping=0.1, weight_decay=0.01, kl_clip=None,
                     relative_damping=False, max_change=None)
    params = list(model.parameters())
    optimizer.step()  # first step: u = α Δ
    previous = [optimizer.state[p]["update"].clone() for p in params]
    curvature.forward_backward(x, t)
    grads = [p.grad + 0.01 * p for p in params]
    directions = [-optimizer.direction(name, p.grad, 0.1) for name, p in model.named_parameters()]
    G = dense_ggn(model, curvature) + 0.11 * torch.eye(sum(p.numel() for p in params), **F64)  # before θ moves
    before = [p.detach().clone() for p in params]
    optimizer.step()
    update = [p.detach() - b for p, b in zip(params, before)]
    D, P, g = (torch.cat([v.reshape(-1) for v in vs]) for vs in (directions, previous, grads))
    basis = torch.stack([D, P], 1)
    alpha_mu = -torch.linalg.solve(basis.T @ G @ basis, basis.T @ g)
    assert torch.allclose(torch.cat([u.reshape(-1) for u in update]), basis @ alpha_mu, atol=1e-10)
    assert torch.allclose(torch.tensor(optimizer.last_alpha_mu, **F64), alpha_mu, atol=1e-10)


def dense_ggn(model, curvature):
    """The full GGN over all parameters from ggn_vector_product on the identity."""
    n = sum(p.numel() for p in model.parameters())
    basis = torch.eye(n, **F64)
    columns, start = [], 0
    for p in model.parameters():
        columns.append(basis[:, start:start + p.numel()].reshape(n, *p.shape))
        start += p.numel()
    products = curvature.ggn_vector_product(columns)
    return torch.cat([v.reshape(n, -1) for v in products], 1)


@pytest.mark.parametrize("key", ["mlp", "cnn"])
def test_kfac_defaults_decrease_the_loss(key):
    """Default KFAC on sampled factors (kind="kfac"), 30 steps on one learnable batch."""
    build, shape, classes = MODELS[key]
    torch.manual_seed(1)
    model = build().double()
    x = torch.randn(32, *shape, **F64)
    t = (x.reshape(32, -1)[:, :classes] * torch.tensor([1.0, 2.0, -1.0], **F64)).argmax(1)
    curvature = hbpc.compile_model(model, x, nn.CrossEntropyLoss()).Curvature(model)
    optimizer = KFAC(model.parameters(), curvature, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(30):
        losses.append(float(curvature.forward_backward(x, t)))
        optimizer.step()
    assert max(losses[1:]) < losses[0] and losses[-1] < 0.75 * losses[0]


def test_kfac_max_change_bounds_every_tensors_step():
    """‖Δθ‖ ≤ max_change · max(‖θ‖, 0.01 √n) for every tensor and step, and the bound is reached (not vacuous)."""
    model, curvature, x, t, _ = bound("mlp", 8)
    optimizer = KFAC(model.parameters(), curvature, kind="kflr", kl_clip=None, damping=1e-6, max_change=0.05)
    reached = 0
    for _ in range(4):
        before = [p.detach().clone() for p in model.parameters()]
        curvature.forward_backward(x, t)
        optimizer.step()
        for b, p in zip(before, model.parameters()):
            ratio = float((p.detach() - b).norm()) / (0.05 * max(float(b.norm()), 0.01 * b.numel() ** 0.5))
            assert ratio <= 1 + 1e-9
            reached += ratio > 1 - 1e-9
    assert reached > 0


def test_kfac_defaults_move_every_layer_of_a_deep_sigmoid_net_alike():
    """Five sigmoid layers: G's scale falls 1e9 from the output to the first layer (exp08's plateau in small).

    Absolute damping turns the early layers' step into a tiny gradient step (relative change 1e-3 against 1e-1
    at the top); the defaults (relative damping, max_change) move every weight by a similar fraction of its norm.
    """
    def relative_changes(**options):
        torch.manual_seed(0)
        layers = [m for _ in range(5) for m in (nn.Linear(6, 6), nn.Sigmoid())]
        model = nn.Sequential(*layers, nn.Linear(6, 3)).double()
        x = torch.randn(32, 6, **F64)
        curvature = hbpc.compile_model(model, x, nn.CrossEntropyLoss()).Curvature(model)
        optimizer = KFAC(model.parameters(), curvature, kind="kflr", **options)
        weights = [m.weight for m in model if isinstance(m, nn.Linear)]
        before = [w.detach().clone() for w in weights]
        curvature.forward_backward(x, x[:, :3].argmax(1))
        optimizer.step()
        scales = [float(optimizer.factors[f"{i}.weight"][0].diagonal().mean()) for i in range(0, 11, 2)]
        assert scales[-1] / scales[0] > 1e8
        return [float((w.detach() - b).norm() / b.norm()) for w, b in zip(weights, before)]

    defaults = relative_changes()
    assert max(defaults) < 2 * min(defaults)
    absolute = relative_changes(relative_damping=False, max_change=None)
    assert absolute[0] < 0.02 * max(absolute)
