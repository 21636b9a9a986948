"""The float64 references agree with each other and with closed forms on the whole zoo."""

import itertools

import pytest
import torch
from torch import fx, nn

from models import IDS, SETTINGS
from reference import (
    MODES,
    apply_mode,
    ggn_block,
    hbp_blocks,
    hessian_block,
    loss_value,
    ops,
    recursion_blocks,
)

FLAGS = list(itertools.product([True, False], repeat=2))


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The problems are tiny: one thread is fastest and immune to oversubscribed cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-10)


def assert_psd(matrix):
    assert_close(matrix, matrix.T)
    assert torch.linalg.eigvalsh(matrix).min() >= -1e-10 * max(1.0, matrix.abs().max())


def zoo_ops():
    """Every module type, function and method used by the zoo, and the conv/pool variants."""
    found = set()
    for setting in SETTINGS:
        graph_module = fx.symbolic_trace(setting.build())
        for node in graph_module.graph.nodes:
            if node.op == "call_module":
                module = graph_module.get_submodule(node.target)
                found.add(type(module))
                if isinstance(module, nn.Conv2d):
                    found |= {f"conv-{key}" for key in ("stride", "dilation") if max(getattr(module, key)) > 1}
                    found |= {"conv-padding"} if max(module.padding) > 0 else set()
                    found |= {"conv-groups"} if module.groups > 1 else set()
                if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
                    found |= {f"{type(module).__name__}-padding"} if module.padding else set()
                    found |= {f"{type(module).__name__}-stride!=kernel"} if module.stride != module.kernel_size else set()
            elif node.op in ("call_function", "call_method"):
                found.add(node.target)
        found.add((setting.loss, setting.reduction))
    return found


def test_zoo_covers_the_core_ops():
    required = {
        nn.Linear, nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.ZeroPad2d, nn.Flatten,
        nn.ReLU, nn.Sigmoid, nn.Tanh,
        "conv-stride", "conv-padding", "conv-dilation", "conv-groups",
        "MaxPool2d-padding", "MaxPool2d-stride!=kernel", "AvgPool2d-padding", "AvgPool2d-stride!=kernel",
        torch.nn.functional.relu, torch.relu, torch.sigmoid, torch.tanh, torch.flatten,
        "tanh", "sigmoid", "relu", "view", "reshape", "flatten",
        ("cross_entropy", "mean"), ("cross_entropy", "sum"), ("mse", "mean"), ("mse", "sum"),
    }
    assert len(SETTINGS) >= 16 and len(set(IDS)) == len(IDS)
    assert required <= zoo_ops()


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_zoo_setting(setting):
    model = setting.build()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert max(p.numel() for p in model.parameters()) <= 300
    x, t = setting.data(3)
    assert model(x).shape == (3, setting.num_classes)
    assert torch.isfinite(loss_value(model, setting.loss_fn(), x, t))
    for p, q in zip(model.parameters(), setting.build().parameters()):
        assert torch.equal(p, q)


def test_apply_mode():
    R = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    R = R + R.T
    absolute, clipped = apply_mode(R, "pch-abs"), apply_mode(R, "pch-clip")
    assert_close(apply_mode(R, "hessian"), R)
    assert_close(apply_mode(R, "ggn"), torch.zeros_like(R))
    assert_close(absolute @ absolute, R @ R)
    assert_close(clipped @ (clipped - R), torch.zeros_like(R))
    for matrix in (absolute, clipped, clipped - R, absolute - clipped):
        assert_psd(matrix)
    diagonal = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64)
    assert_close(apply_mode(torch.diag(diagonal), "pch-abs"), torch.diag(diagonal.abs()))
    with pytest.raises(ValueError, match="unknown curvature"):
        apply_mode(R, "fisher")


def test_ops_rejects_a_residual_connection():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 3)

        def forward(self, x):
            return x + self.linear(x)

    with pytest.raises(ValueError, match="not chain-shaped"):
        ops(Residual())


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_recursion_is_exact_for_hessian_and_ggn(setting):
    """`recursion_blocks` at N = 3: `hessian` gives ∇²L's blocks, `ggn` the GGN's."""
    model, loss_fn = setting.build(), setting.loss_fn()
    x, t = setting.data(3)
    hessians = recursion_blocks(model, loss_fn, x, t, "hessian")
    ggns = recursion_blocks(model, loss_fn, x, t, "ggn")
    assert list(hessians) == [name for name, _ in model.named_parameters()]
    for name in hessians:
        assert_close(hessians[name], hessian_block(model, loss_fn, x, t, name))
        assert_close(ggns[name], ggn_block(model, loss_fn, x, t, name))


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_recursion_modes_are_ordered(setting):
    """Residual modes only add PSD terms: `0 ⪯ ggn ⪯ pch-clip ⪯ pch-abs` blockwise."""
    model, loss_fn = setting.build(), setting.loss_fn()
    x, t = setting.data(3)
    ggn, clip, absolute = (recursion_blocks(model, loss_fn, x, t, mode) for mode in ("ggn", "pch-clip", "pch-abs"))
    for name in ggn:
        for matrix in (ggn[name], clip[name] - ggn[name], absolute[name] - clip[name]):
            assert_psd(matrix)


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_hbp_is_exact_at_batch_size_one(setting):
    """At N = 1, HBP with any flags equals the exact recursion in every mode,
    the true Hessian blocks for `hessian` and the GGN blocks for `ggn`."""
    model, loss_fn = setting.build(), setting.loss_fn()
    x, t = setting.data(1)
    exact = {"hessian": hessian_block, "ggn": ggn_block}
    for mode in MODES:
        recursion = recursion_blocks(model, loss_fn, x, t, mode)
        for name in recursion:
            if mode in exact:
                assert_close(recursion[name], exact[mode](model, loss_fn, x, t, name))
        for flags in FLAGS:
            blocks = hbp_blocks(model, loss_fn, x, t, mode, *flags)
            for name in recursion:
                assert_close(blocks[name], recursion[name])


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
@pytest.mark.parametrize("average_parameter_jacobian", [True, False], ids=["mean-J", "mean-JJ"])
def test_hbp_last_linear_layer_is_kronecker(setting, average_parameter_jacobian):
    """At N = 3 the output layer `z = W x + b` has `B_W = S_z ⊗ x̄x̄ᵀ` (or `S_z ⊗ E[x xᵀ]`)
    and `B_b = S_z`, with `S_z = Σ_n ∇²_{z_n} L` from the full-batch loss Hessian."""
    model, loss_fn = setting.build(), setting.loss_fn()
    x, t = setting.data(3)
    chain = ops(model)
    last = chain[-1]
    if not isinstance(last.module, nn.Linear):
        pytest.skip("output op is not an nn.Linear")
    features = x
    for op in chain[:-1]:
        features = op(features)
    z = model(x).detach()
    H_z = torch.autograd.functional.hessian(lambda z: loss_fn(z, t), z)
    S_z = torch.einsum("ncnd->cd", H_z)
    if average_parameter_jacobian:
        mean = features.mean(0)
        input_factor = torch.outer(mean, mean)
    else:
        input_factor = features.T @ features / x.shape[0]
    blocks = hbp_blocks(model, loss_fn, x, t, "ggn", True, average_parameter_jacobian)
    assert_close(blocks[last.names["weight"]], torch.kron(S_z, input_factor))
    assert_close(blocks[last.names["bias"]], S_z)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda flags: f"avg-input-{flags[0]}-avg-param-{flags[1]}")
def test_hbp_two_layer_sigmoid_net_closed_form(mode, flags):
    """`z = W₂ σ(a) + b₂`, `a = W₁ x + b₁` at N = 4, written out by hand:

    `S_h = W₂ᵀ S_z W₂`, `S_a = E[D]ᵀ S_h E[D]` (or `E[D S_h D]`) `+ mode(diag Σ_n g_n ⊙ σ''(a_n))`
    with `D_n = diag σ'(a_n)`, `g_n = W₂ᵀ ∂L/∂z_n`, and `B_{W₁} = S_a ⊗ x̄x̄ᵀ` (or `S_a ⊗ E[x xᵀ]`).
    """
    average_input_jacobian, average_parameter_jacobian = flags
    setting = SETTINGS[IDS.index("linear-sigmoid-linear_ce-mean")]
    model, loss_fn = setting.build(), setting.loss_fn()
    x, t = setting.data(4)
    W1, b1, W2 = model[0].weight.detach(), model[0].bias.detach(), model[2].weight.detach()

    a = x @ W1.T + b1
    s = torch.sigmoid(a)
    z = (s @ W2.T + model[2].bias).detach().requires_grad_()
    (dL_dz,) = torch.autograd.grad(loss_fn(z, t), z)
    S_z = torch.einsum("ncnd->cd", torch.autograd.functional.hessian(lambda z: loss_fn(z, t), z))

    S_h = W2.T @ S_z @ W2
    d1, d2 = s * (1 - s), s * (1 - s) * (1 - 2 * s)
    if average_input_jacobian:
        S_a = torch.diag(d1.mean(0)) @ S_h @ torch.diag(d1.mean(0))
    else:
        S_a = S_h * (d1.T @ d1) / x.shape[0]
    residual = ((dL_dz @ W2) * d2).sum(0)
    S_a = S_a + torch.diag({"hessian": residual, "ggn": 0 * residual, "pch-abs": residual.abs(), "pch-clip": residual.clamp(min=0)}[mode])
    input_factor = torch.outer(x.mean(0), x.mean(0)) if average_parameter_jacobian else x.T @ x / x.shape[0]

    blocks = hbp_blocks(model, loss_fn, x, t, mode, average_input_jacobian, average_parameter_jacobian)
    assert_close(blocks["0.weight"], torch.kron(S_a, input_factor))
    assert_close(blocks["0.bias"], S_a)
    assert_close(blocks["2.bias"], S_z)


def test_ops_rejects_a_size_from_an_earlier_op():
    class Stale(nn.Module):
        def forward(self, x):
            size = x.size(0)
            return torch.relu(x).view(size, -1)

    with pytest.raises(ValueError, match="not chain-shaped"):
        ops(Stale())
