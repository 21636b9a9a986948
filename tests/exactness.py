"""One float64 exactness check of a compiled module against autograd: loss, gradient, products, a block;
and the evaluation scope of a loss rule's emitted code.

Used by the rule tests, the user-rule tests and the user-rule fuzzer; ``assert_dense_exact`` (every product and
block against dense autograd matrices, for small models) by the op tests. References come from torch.autograd /
torch.func only.
"""
import torch
from torch.func import functional_call, jvp, vjp

import hbpc
from hbpc.derive import derive

from reference import ggn_block, hessian_block
from test_full_products import _true_ggn, _true_hessian, parameter_slices

ATOL, RTOL = 1e-9, 1e-7


def _close(name, got, want):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"{name}: max error {(got - want).abs().max():.3g}"


def _reference_products(model, loss_fn, x, t, vs):
    """(loss, gradients, Hessian product, GGN product) of L(θ) = loss_fn(model(x), t) at direction ``vs``."""
    names = [name for name, _ in model.named_parameters()]
    params = {name: p.detach().requires_grad_(True) for name, p in model.named_parameters()}
    loss = loss_fn(functional_call(model, params, (x,)), t)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), list(params.values()), allow_unused=True)
    hvp = [torch.zeros_like(p) if h is None else h for h, p in zip(hvp, params.values())]  # L linear in p
    detached = {name: p.detach() for name, p in params.items()}

    def output(*theta):
        return functional_call(model, dict(zip(names, theta)), (x,))

    z, Jv = jvp(output, tuple(detached.values()), tuple(vs))
    z = z.detach().requires_grad_(True)
    (gz,) = torch.autograd.grad(loss_fn(z, t), z, create_graph=True)
    if gz.requires_grad:
        (HJv,) = torch.autograd.grad((gz * Jv).sum(), z)
    else:
        HJv = torch.zeros_like(z)  # L linear in z
    _, pullback = vjp(output, *detached.values())
    ggn = pullback(HJv)
    return loss.detach(), [g.detach() for g in grads], list(hvp), list(ggn)


def check_exact(module, model, loss_fn, x, t, block: str, generator=None):
    """Assert the compiled ``module`` agrees with autograd on ``model``; ``block`` names the parameter whose
    Hessian and GGN blocks are compared at N = 1 (where HBP is exact on a chain)."""
    curvature = module.Curvature(model)
    for p in model.parameters():
        p.grad = None
    loss = curvature.forward_backward(x, t)
    vs = [torch.randn(p.shape, dtype=torch.float64, generator=generator) for p in model.parameters()]
    want_loss, want_grads, want_hvp, want_ggn = _reference_products(model, loss_fn, x, t, vs)
    _close("loss", loss.detach(), want_loss)
    for (name, p), g in zip(model.named_parameters(), want_grads):
        _close(f"gradient of {name}", p.grad, g)
    for name, got, want in zip([n for n, _ in model.named_parameters()], curvature.hessian_vector_product(vs),
                               want_hvp):
        _close(f"Hessian product, {name}", got, want)
    for name, got, want in zip([n for n, _ in model.named_parameters()], curvature.ggn_vector_product(vs),
                               want_ggn):
        _close(f"GGN product, {name}", got, want)
    curvature.forward_backward(x[:1], t[:1])
    _close(f"Hessian block of {block} at N=1", curvature.blocks("hessian")[block].to_dense(),
           hessian_block(model, loss_fn, x[:1], t[:1], block))
    _close(f"GGN block of {block} at N=1", curvature.blocks("ggn")[block].to_dense(),
           ggn_block(model, loss_fn, x[:1], t[:1], block))


def loss_scope(rule, z, t, v) -> tuple[dict, dict]:
    """A loss rule's emitted code ``{key: expression}`` and the scope to ``eval`` it in (its intermediates and
    shared lines already evaluated on the logits ``z``, targets ``t`` and vectors ``v``)."""
    derivation = derive(rule)
    shared, code = derivation.code(rule.hyper)
    scope = {"torch": torch, "z": z, "t": t, "v": v}
    for name, expr in derivation.intermediates.items():
        scope[name] = eval(expr, scope)
    for line in shared:
        target, expr = line.split(" = ", 1)
        scope[target] = eval(expr, scope)
    return code, scope


def _blocks_of(matrix, model):
    return {name: matrix[where, where] for name, where in parameter_slices(model).items()}


def assert_dense_exact(model, x, t, loss_fn):
    """Loss, gradient, full Hessian and GGN products, exact block products, and the blocks at N = 1."""
    curvature = hbpc.compile_model(model, x[:2], loss_fn).Curvature(model)  # compiled for N = 2, run at N = 3
    loss = curvature.forward_backward(x, t)
    expected = loss_fn(model(x), t)
    grads = torch.autograd.grad(expected, list(model.parameters()))
    assert torch.allclose(loss, expected, atol=1e-12)
    for p, g in zip(model.parameters(), grads):
        assert torch.allclose(p.grad, g, atol=1e-12)

    H, G = _true_hessian(model, loss_fn, x, t), _true_ggn(model, loss_fn, x, t)
    vs = [torch.randn(*p.shape, dtype=torch.float64) for p in model.parameters()]
    flat = torch.cat([v.flatten() for v in vs])
    for product, truth in ((curvature.hessian_vector_product, H), (curvature.ggn_vector_product, G)):
        assert torch.allclose(torch.cat([o.flatten() for o in product(vs)]), truth @ flat, atol=1e-10)
    for name_, truth in (("hessian", H), ("ggn", G)):
        products, exact = curvature.block_products(name_), _blocks_of(truth, model)
        for name, p in model.named_parameters():
            basis = torch.eye(p.numel(), dtype=p.dtype).reshape(-1, *p.shape)
            dense = products[name](basis).reshape(p.numel(), p.numel())
            assert torch.allclose(dense, exact[name], atol=1e-10), (name_, name)

    curvature.forward_backward(x[:1], t[:1])
    for name_, truth in (("hessian", _true_hessian), ("ggn", _true_ggn)):
        exact = _blocks_of(truth(model, loss_fn, x[:1], t[:1]), model)
        blocks = curvature.blocks(name_, False, False)
        for name, _ in model.named_parameters():
            assert torch.allclose(blocks[name].to_dense(), exact[name], atol=1e-10), (name_, name)
