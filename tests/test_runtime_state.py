"""What the generated module supports at run time beyond the happy path, each against autograd in float64:
probability (soft-label) targets for cross-entropy, parameters and buffers replaced on the model, a cache made
stale by an optimizer step (refused, then exact again after forward_backward), and float16/bfloat16 inputs."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import hbpc

F64 = dict(dtype=torch.float64)
_MODULES = {}


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _module(loss_fn, build=_mlp, key=None):
    key = key or type(loss_fn).__name__ + repr(vars(loss_fn).get("label_smoothing"))
    if key not in _MODULES:
        _MODULES[key] = hbpc.compile_model(build(), torch.randn(2, 4, **F64), loss_fn)
    return _MODULES[key]


def _loss_of(model, loss_fn, x, t):
    names = [name for name, _ in model.named_parameters()]
    return lambda *params: loss_fn(functional_call(model, dict(zip(names, params)), (x,)), t)


def _full_hessian(model, loss_fn, x, t):
    params = tuple(p.detach() for p in model.parameters())
    blocks = hessian(_loss_of(model, loss_fn, x, t), argnums=tuple(range(len(params))))(*params)
    sizes = [p.numel() for p in params]
    return torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(params))], 1)
                      for i in range(len(params))], 0)


def _full_ggn(model, loss_fn, x, t):
    params = {name: p.detach() for name, p in model.named_parameters()}
    outputs = lambda p: functional_call(model, p, (x,))  # noqa: E731
    J = jacrev(outputs)(params)
    z = outputs(params).detach()
    H_z = hessian(lambda z: loss_fn(z, t))(z).reshape(z.numel(), z.numel())
    J = torch.cat([J[name].reshape(z.numel(), -1) for name in params], 1)
    return J.T @ H_z @ J


def _flat(vectors):
    return torch.cat([v.reshape(-1) for v in vectors])


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_probability_targets_are_exact(smoothing):
    """Soft labels as torch takes them: loss, p.grad, GGN and Hessian products, a block and the KFLR factors."""
    loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing)
    module, model = _module(loss_fn), _mlp()
    x = torch.randn(5, 4, **F64)
    t = torch.softmax(torch.randn(5, 3, **F64), 1)
    curvature = module.Curvature(model)
    loss = curvature.forward_backward(x, t)
    expected = loss_fn(model(x), t)
    grads = torch.autograd.grad(expected, list(model.parameters()))
    assert torch.allclose(loss, expected, rtol=1e-12)
    for p, g in zip(model.parameters(), grads):
        assert torch.allclose(p.grad, g, rtol=1e-10, atol=1e-12)
    vs = [torch.randn_like(p) for p in model.parameters()]
    H, G = _full_hessian(model, loss_fn, x, t), _full_ggn(model, loss_fn, x, t)
    assert torch.allclose(_flat(curvature.hessian_vector_product(vs)), H @ _flat(vs), rtol=1e-9, atol=1e-12)
    assert torch.allclose(_flat(curvature.ggn_vector_product(vs)), G @ _flat(vs), rtol=1e-9, atol=1e-12)
    product = curvature.block_products("hessian")["0.weight"]
    assert torch.allclose(product(vs[0]).reshape(-1), H[:20, :20] @ vs[0].reshape(-1), rtol=1e-9, atol=1e-12)


def test_probability_targets_give_the_hessian_of_one_hot_labels_at_the_same_logits():
    """∇²_z CE does not depend on the target: the GGN with soft labels equals the GGN with any labels."""
    module, model = _module(nn.CrossEntropyLoss()), _mlp()
    x = torch.randn(5, 4, **F64)
    vs = [torch.randn_like(p) for p in model.parameters()]
    curvature = module.Curvature(model)
    curvature.forward_backward(x, torch.softmax(torch.randn(5, 3, **F64), 1))
    soft = curvature.ggn_vector_product(vs)
    curvature.forward_backward(x, torch.randint(3, (5,)))
    for a, b in zip(soft, curvature.ggn_vector_product(vs)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_stale_parameters_are_refused_then_exact_after_forward_backward():
    """optimizer.step() changes the weights in place: the old cache would mix two points, so products refuse;
    forward_backward at the new point makes them exact again."""
    loss_fn = nn.CrossEntropyLoss()
    module, model = _module(loss_fn), _mlp()
    x, t = torch.randn(6, 4, **F64), torch.randint(3, (6,))
    vs = [torch.randn_like(p) for p in model.parameters()]
    curvature = module.Curvature(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    curvature.forward_backward(x, t)
    products = curvature.block_products("ggn")
    optimizer.step()
    for stale in (lambda: curvature.hessian_vector_product(vs), lambda: curvature.blocks("pch-abs"),
                  lambda: products["0.weight"](vs[0]), lambda: curvature.kronecker_factors("kflr"),
                  curvature.check_current):
        with pytest.raises(RuntimeError, match="changed in place since forward_backward .*optimizer.step"):
            stale()
    curvature.forward_backward(x, t)
    curvature.check_current()
    H = _full_hessian(model, loss_fn, x, t)
    assert torch.allclose(_flat(curvature.hessian_vector_product(vs)), H @ _flat(vs), rtol=1e-9, atol=1e-12)
    assert torch.allclose(products["0.weight"](vs[0]).reshape(-1),
                          _full_ggn(model, loss_fn, x, t)[:20, :20] @ vs[0].reshape(-1), rtol=1e-9, atol=1e-12)


def test_replaced_parameter_is_used_by_the_next_forward_backward():
    loss_fn = nn.CrossEntropyLoss()
    module, model = _module(loss_fn), _mlp()
    x, t = torch.randn(6, 4, **F64), torch.randint(3, (6,))
    curvature = module.Curvature(model)
    curvature.forward_backward(x, t)
    model[2].weight = nn.Parameter(torch.randn(3, 5, **F64))  # e.g. loading a checkpoint by assignment
    with pytest.raises(RuntimeError, match="2.weight was replaced on the model since forward_backward"):
        curvature.ggn_vector_product([torch.zeros_like(p) for p in model.parameters()])
    loss = curvature.forward_backward(x, t)
    assert torch.allclose(loss, loss_fn(model(x), t), rtol=1e-12)
    vs = [torch.randn_like(p) for p in model.parameters()]
    G = _full_ggn(model, loss_fn, x, t)
    assert torch.allclose(_flat(curvature.ggn_vector_product(vs)), G @ _flat(vs), rtol=1e-9, atol=1e-12)
    assert model[2].weight.grad is not None


def _batch_norm_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[1].running_mean.normal_()
    return model.eval()


def test_replaced_buffer_is_used_by_the_next_forward_backward():
    loss_fn = nn.CrossEntropyLoss()
    module = _module(loss_fn, _batch_norm_model, key="batchnorm")
    model = _batch_norm_model()
    x, t = torch.randn(6, 4, **F64), torch.randint(3, (6,))
    curvature = module.Curvature(model)
    curvature.forward_backward(x, t)
    model[1].running_var = torch.rand(5, **F64) + 0.5  # a new tensor, not an in-place update
    with pytest.raises(RuntimeError, match="1.running_var was replaced on the model"):
        curvature.blocks()
    assert torch.allclose(curvature.forward_backward(x, t), loss_fn(model(x), t), rtol=1e-12)
    model.train()  # the compiled map is the eval-mode one
    with pytest.raises(RuntimeError, match="training mode .*1.* model.eval()"):
        curvature.forward_backward(x, t)


def test_a_failed_forward_backward_keeps_the_previous_cache():
    """Arguments are checked before anything is computed, so a bad call leaves the last good state usable."""
    module, model = _module(nn.CrossEntropyLoss()), _mlp()
    x, t = torch.randn(6, 4, **F64), torch.randint(3, (6,))
    curvature = module.Curvature(model)
    curvature.forward_backward(x, t)
    vs = [torch.randn_like(p) for p in model.parameters()]
    before = curvature.ggn_vector_product(vs)
    with pytest.raises(ValueError, match="target"):
        curvature.forward_backward(torch.randn(2, 4, **F64), t)
    for a, b in zip(before, curvature.ggn_vector_product(vs)):
        assert torch.equal(a, b)


def _layer_norm_mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()
    nn.init.normal_(model[1].weight, 1.0, 0.5)
    return model


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("loss_fn, build", [(nn.CrossEntropyLoss(), _mlp), (nn.MSELoss(), _mlp),
                                            (nn.CrossEntropyLoss(), _layer_norm_mlp)], ids=["ce", "mse", "layernorm"])
def test_half_precision_matches_float64(dtype, tolerance, loss_fn, build):
    """float16/bfloat16 models run every quantity in their dtype; eigh, svd and solve (pch-abs of LayerNorm's
    residual, Kronecker and dense solves, KFLR roots) run in float32 and come back in the model's dtype.
    Within ``tolerance`` of float64."""
    module = _module(loss_fn, build, key=f"{type(loss_fn).__name__}-{build.__name__}")
    reference, model = build(), build().to(dtype)
    x = torch.randn(8, 4, **F64)
    t = torch.randint(3, (8,)) if isinstance(loss_fn, nn.CrossEntropyLoss) else torch.randn(8, 3, **F64)
    named = {name: torch.randn_like(p) for name, p in reference.named_parameters()}
    vs = list(named.values())
    exact, half = module.Curvature(reference), module.Curvature(model)
    results = []
    for curvature, cast in ((exact, lambda a: a), (half, lambda a: a.to(dtype) if a.is_floating_point() else a)):
        loss = curvature.forward_backward(cast(x), cast(t))
        blocks = curvature.blocks("pch-abs")
        factors = curvature.kronecker_factors("kflr")
        results.append({
            "loss": loss.reshape(1),
            "grad": _flat([p.grad for p in curvature.model.parameters()]),
            "ggn": _flat(curvature.ggn_vector_product([cast(v) for v in vs])),
            "hessian": _flat(curvature.hessian_vector_product([cast(v) for v in vs])),
            "pch-abs block": _flat([blocks[name] @ cast(v) for name, v in named.items()]),
            "pch-abs solve": _flat([blocks[name].solve(cast(v), 1.0) for name, v in named.items()]),
            "kflr solve": _flat([factors[name].solve(cast(named[name]), 1.0) for name in factors]),
            "block product": _flat([f(cast(v)) for f, v in zip(curvature.block_products("hessian").values(), vs)]),
        })
    for quantity, expected in results[0].items():
        actual = results[1][quantity]
        assert actual.dtype == dtype, quantity
        error = (actual.double() - expected).norm() / expected.norm().clamp(min=1e-12)
        assert error < tolerance, f"{quantity}: relative error {error:.3g} in {dtype}"
