"""Full-network products against the true Hessian and GGN (float64, torch.autograd / torch.func)."""
import pytest
import torch
from torch.func import functional_call, jacrev

from conftest import compiled
from models import IDS, SETTINGS


def _flat_loss(model, loss_fn, x, t):
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def loss(flat):
        pieces = torch.split(flat, [s.numel() for s in shapes])
        params = {n: piece.reshape(s) for n, piece, s in zip(names, pieces, shapes)}
        return loss_fn(functional_call(model, params, (x,)), t)

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return loss, flat, names, shapes


def parameter_slices(model):
    """``{name: slice}`` of each parameter in the flattened parameter vector (model order)."""
    slices, start = {}, 0
    for name, p in model.named_parameters():
        slices[name] = slice(start, start + p.numel())
        start += p.numel()
    return slices


def _true_hessian(model, loss_fn, x, t):
    loss, flat, _, _ = _flat_loss(model, loss_fn, x, t)
    return torch.autograd.functional.hessian(loss, flat)


def _true_ggn(model, loss_fn, x, t):
    names = [name for name, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    z = model(x).detach()
    jac = jacrev(lambda ps: functional_call(model, ps, (x,)))(params)
    J = torch.cat([jac[n].reshape(z.numel(), -1) for n in names], dim=1)
    H = torch.autograd.functional.hessian(lambda out: loss_fn(out.reshape(z.shape), t), z.flatten())
    return J.T @ H @ J


def _apply(product, matrix_shapes, V):
    """Columns of the product's matrix on a random batch of V vectors."""
    vs = [torch.randn(V, *s, dtype=torch.float64) for s in matrix_shapes]
    out = product(vs)
    flat_in = torch.cat([v.reshape(V, -1) for v in vs], dim=1)
    flat_out = torch.cat([o.reshape(V, -1) for o in out], dim=1)
    return flat_in, flat_out


def _bound(setting, N=3):
    model = setting.build()
    x, t = setting.data(N)
    curvature = compiled(setting).Curvature(model)
    curvature.forward_backward(x, t)
    return model, x, t, curvature


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_hessian_vector_product_is_the_true_hessian(setting):
    model, x, t, curvature = _bound(setting)
    H = _true_hessian(setting.build(), setting.loss_fn(), x, t)
    shapes = [p.shape for p in model.parameters()]
    v_in, v_out = _apply(curvature.hessian_vector_product, shapes, 4)
    assert torch.allclose(v_out, v_in @ H.T, atol=1e-10)


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_ggn_vector_product_is_the_true_ggn(setting):
    model, x, t, curvature = _bound(setting)
    G = _true_ggn(setting.build(), setting.loss_fn(), x, t)
    shapes = [p.shape for p in model.parameters()]
    v_in, v_out = _apply(curvature.ggn_vector_product, shapes, 4)
    assert torch.allclose(v_out, v_in @ G.T, atol=1e-10)
    single = curvature.ggn_vector_product([torch.ones(s, dtype=torch.float64) for s in shapes])
    assert [tuple(o.shape) for o in single] == [tuple(s) for s in shapes]


CE_SETTINGS = [s for s in SETTINGS if s.loss == "cross_entropy"][:4]


@pytest.mark.parametrize("setting", CE_SETTINGS, ids=[s.id for s in CE_SETTINGS])
def test_fisher_mc_product_estimates_the_ggn(setting):
    model, x, t, curvature = _bound(setting)
    shapes = [p.shape for p in model.parameters()]
    vs = [torch.randn(s, dtype=torch.float64) for s in shapes]
    exact = torch.cat([o.flatten() for o in curvature.ggn_vector_product(vs)])
    generator = torch.Generator().manual_seed(0)
    estimate = torch.cat([o.flatten() for o in curvature.fisher_mc_vector_product(vs, 20000, generator)])
    assert (estimate - exact).norm() <= 0.05 * exact.norm()
    again = curvature.fisher_mc_vector_product(vs, 3, torch.Generator().manual_seed(1))
    repeat = curvature.fisher_mc_vector_product(vs, 3, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(again, repeat))


def test_full_products_need_forward_backward_first():
    setting = SETTINGS[0]
    curvature = compiled(setting).Curvature(setting.build())
    with pytest.raises(RuntimeError, match="call forward_backward"):
        curvature.hessian_vector_product([torch.zeros(p.shape) for p in setting.build().parameters()])
