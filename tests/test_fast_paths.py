"""Issue 6: the lowerings the emitter picks for speed equal the derived einsums, and blocks()' memory check is honest."""
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hbpc
from hbpc.emit import nodes
from test_more_ops import MODELS, _setup

F64 = dict(dtype=torch.float64)


class LiveBytes(TorchDispatchMode):
    """The bytes of storages allocated inside the mode and still referenced by a tensor; ``peak`` the most at once."""

    def __init__(self):
        super().__init__()
        self.users, self.live, self.peak = {}, 0, 0

    def _release(self, key, nbytes):
        self.users[key] -= 1
        if not self.users[key]:
            del self.users[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        known = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
                continue
            key, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            if key in known and key not in self.users:
                continue  # a view or an in-place result of a tensor from outside the mode
            if key not in self.users:
                self.users[key] = 0
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            self.users[key] += 1
            weakref.finalize(t, self._release, key, nbytes)
        return out


def _compile_both(model, x, loss_fn, monkeypatch, folder):
    """The generated module as hbpc lowers it, and with every convolution kept on its derived einsums."""
    lowered = hbpc.compile_model(model, x, loss_fn, path=folder / "lowered.py")
    with monkeypatch.context() as patch:
        patch.setattr(nodes, "convolution_lowering", lambda node: None)
        einsum = hbpc.compile_model(model, x, loss_fn, path=folder / "einsum.py")
    return lowered, einsum


def _results(curvature, model, x, t):
    for p in model.parameters():
        p.grad = None
    out = {"loss": curvature.forward_backward(x, t), **{f"grad {n}": p.grad for n, p in model.named_parameters()}}
    generator = torch.Generator().manual_seed(2)
    vs = [torch.randn(2, *p.shape, generator=generator, **F64) for p in model.parameters()]
    out["ggn"] = curvature.ggn_vector_product(vs)
    out["hessian"] = curvature.hessian_vector_product(vs)
    for mode in ("hessian", "ggn", "pch-abs"):
        products = curvature.block_products(mode)
        out.update({f"{mode} product {n}": products[n](v) for (n, _), v in zip(model.named_parameters(), vs)})
    for flags in ((False, False), (True, True)):
        blocks = curvature.blocks("pch-clip", *flags)
        out.update({f"{flags} block {n}": b.to_dense() for n, b in blocks.items()})
    return out


@pytest.mark.parametrize("key", list(MODELS))
def test_convolution_lowering_equals_the_einsum_derivation(key, monkeypatch, tmp_path):
    """conv1d/2d/3d and transposed, with stride, padding, output_padding, dilation and groups; V = 2 vectors."""
    model, x, t, loss_fn = _setup(key, "ce-mean", 3)
    lowered, einsum = _compile_both(model, x, loss_fn, monkeypatch, tmp_path)
    assert "conv_apply(" in (tmp_path / "lowered.py").read_text()
    assert "conv_apply(" not in (tmp_path / "einsum.py").read_text()
    ours, derived = _results(lowered.Curvature(model), model, x, t), _results(einsum.Curvature(model), model, x, t)
    for name, value in derived.items():
        for a, b in zip(ours[name] if isinstance(value, list) else [ours[name]], value if isinstance(value, list) else [value]):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), name


def test_one_by_one_convolutions_keep_the_einsums(tmp_path):
    """Patches of a 1×1, stride-1 kernel are the input itself: nothing to save, so the derived einsums stay."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Tanh(), nn.Conv2d(4, 2, 3), nn.Flatten(), nn.Linear(8, 3)).double()
    hbpc.compile_model(model, torch.randn(2, 3, 4, 4, **F64), nn.CrossEntropyLoss(), path=tmp_path / "m.py")
    source = (tmp_path / "m.py").read_text()
    assert "conv_apply(v, self.p['0.weight']" not in source and "conv_apply(v, self.p['2.weight']" in source


def test_parameter_gradients_share_no_memory_with_the_cache():
    """accumulate_grad stores the fresh vjp without a copy: an in-place update of p.grad must not touch the cache."""
    model, x, t, loss_fn = _setup("transpose", "ce-mean", 3)
    curvature = hbpc.compile_model(model, x, loss_fn).Curvature(model)
    curvature.forward_backward(x, t)
    cached = {v.untyped_storage().data_ptr() for v in vars(curvature).values() if isinstance(v, torch.Tensor)}
    assert cached and all(p.grad.untyped_storage().data_ptr() not in cached for p in model.parameters())


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 96), nn.Sigmoid(), nn.Linear(96, 64), nn.Tanh(), nn.Linear(64, 5))


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sigmoid(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 5))


def _padded_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sigmoid(), nn.MaxPool2d(2), nn.ZeroPad2d(1),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(144, 5))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.outer = nn.Linear(48, 48), nn.Linear(48, 5)

    def forward(self, x):
        h = x.flatten(1)
        return self.outer(h + torch.tanh(self.inner(h)))


@pytest.mark.parametrize("build, size", [(_mlp, 4), (_cnn, 4), (_padded_cnn, 8), (Residual, 4)],
                         ids=["mlp", "cnn", "padded-cnn", "residual"])
@pytest.mark.parametrize("N", [2, 400])
def test_blocks_memory_bounds_what_blocks_allocate(build, size, N):
    """blocks_memory() (what _check_memory refuses from) is at least the most blocks() holds at once."""
    torch.manual_seed(0)
    model, x = build().double(), torch.randn(N, 3, size, size, **F64)
    t = torch.randint(5, (N,))
    curvature = hbpc.compile_model(model, x, nn.CrossEntropyLoss()).Curvature(model)
    curvature.forward_backward(x, t)
    for mode, flags in (("hessian", (False, False)), ("ggn", (True, True))):
        with LiveBytes() as tracked:
            blocks = curvature.blocks(mode, *flags)
        del blocks
        assert 0 < tracked.peak <= curvature.blocks_memory(), (mode, tracked.peak, curvature.blocks_memory())


def test_blocks_are_refused_before_anything_is_allocated():
    torch.manual_seed(0)
    model, x = _cnn().double(), torch.randn(4, 3, 4, 4, **F64)
    curvature = hbpc.compile_model(model, x, nn.CrossEntropyLoss()).Curvature(model)
    curvature.forward_backward(x, torch.randint(5, (4,)))
    curvature.memory_limit = curvature.blocks_memory() - 1
    with LiveBytes() as tracked, pytest.raises(MemoryError, match=r"blocks\(\) needs .* GiB .* more than memory_limit"):
        curvature.blocks("ggn", False, False)
    assert tracked.peak == 0
    curvature.memory_limit += 1
    assert set(curvature.blocks("ggn", False, False)) == {name for name, _ in model.named_parameters()}
