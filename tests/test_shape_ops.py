"""Issue 16 (front end): shape-specialized tracing, shape ops, uneven pooling, RMSNorm and GroupNorm lowered onto
existing rules; exact against autograd in float64."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hbpc
from hbpc.export import load_model_file
from hbpc.export.chains import adaptive_windows, avg_pool_windows
from exactness import assert_dense_exact
from reference import hbp_blocks, recursion_blocks


class ShapeOps(nn.Module):
    """transpose, permute, split, squeeze, a learned positional parameter, indexing with steps, mean, sum, cat."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 4, 3) / 3)
        self.scale = nn.Parameter(1 + torch.randn(3) / 3)
        self.lin = nn.Linear(6, 6)
        self.out = nn.Linear(12, 3)

    def forward(self, x):                                          # (N, 4, 3, 2)
        B, T, C, D = x.size()
        x = x.transpose(1, 2).permute(0, 2, 3, 1)                  # (N, 4, 2, 3)
        a, b = x.split(1, dim=2)                                   # (N, 4, 1, 3) each
        x = torch.tanh(a.squeeze(2) + self.pos) * self.scale + b[:, :, 0]  # (N, 4, 3)
        y = x[:, 0::2]                                             # (N, 2, 3)
        z = x.mean(dim=1, keepdim=True)                            # (N, 1, 3)
        w = torch.cat([y, z, x[:, -3:-2]], 1).sum(-1)              # (N, 4)
        h = torch.sigmoid(self.lin(torch.cat([w, x[:, 0, 0:2]], 1)))
        rest = torch.tanh(x[:, :, ::2]).reshape(B, T * 2)[:, :6]   # (N, 6)
        return self.out(torch.cat([h, rest], 1))


class Indexing(nn.Module):
    """``x[:, 0, ::2, 0:2]``, a CLS-token read-out ``h[:, 0]``, chunk, unbind, narrow, unsqueeze, sums over axes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4 + 2 * 2 + 5 + 2, 3)

    def forward(self, x):                                          # (N, 3, 5, 5)
        h = torch.tanh(self.conv(x))                               # (N, 4, 5, 5)
        picked = h[:, 0, ::2, 0:2]                                 # (N, 3, 2)
        tokens = h.flatten(2).transpose(1, 2)                      # (N, 25, 4): a sequence of 25 tokens
        cls = tokens[:, 0]                                         # (N, 4)
        first, second = torch.chunk(picked, 2, dim=1)              # (N, 2, 2), (N, 1, 2)
        rows = torch.unbind(h[:, 1:2, :, 4], dim=1)[0]             # (N, 5)
        summed = torch.sigmoid(first).sum(dim=(1, 2)).unsqueeze(-1)   # (N, 1)
        return self.fc(torch.cat([cls, (first * 2).flatten(1), rows, summed, second.narrow(2, 1, 1)[..., 0],
                                  ], 1))


class Pooling(nn.Module):
    """Uneven adaptive pooling (1d, 2d), avg pooling with ceil_mode / count_include_pad=False / divisor_override,
    max pooling with ceil_mode, GroupNorm and RMSNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 2)
        self.conv2 = nn.Conv2d(3, 2, 1)
        self.group_norm = nn.GroupNorm(3, 3)
        self.rms_norm = nn.RMSNorm(2, eps=1e-6)
        self.out = nn.Linear(38, 3)

    def forward(self, x):                                                         # (N, 2, 11)
        h = torch.tanh(self.conv(x))                                              # (N, 3, 10)
        a = F.adaptive_avg_pool1d(h, 4)                                           # (N, 3, 4)
        g = self.group_norm(h.reshape(-1, 3, 2, 5))                               # (N, 3, 2, 5)
        b = F.avg_pool2d(torch.tanh(g), 2, 2, 1, ceil_mode=True, count_include_pad=False)
        c = F.max_pool1d(h, 3, 3, ceil_mode=True)                                 # (N, 3, 4)
        d = F.avg_pool2d(torch.sigmoid(self.conv2(g)), (2, 3), divisor_override=4)
        e = F.adaptive_avg_pool2d(torch.sigmoid(g), (2, 3))                        # (N, 3, 2, 3)
        r = self.rms_norm(torch.sigmoid(b[:, :, 0, :2]))                          # (N, 3, 2)
        return self.out(torch.cat([a.flatten(1)[:, :12], c.flatten(1)[:, :6], e.flatten(1)[:, :12],
                                   r.flatten(1), d.flatten(1)], 1))


MODELS = {"shape-ops": (ShapeOps, (4, 3, 2)), "indexing": (Indexing, (3, 5, 5)), "pooling": (Pooling, (2, 11))}
LOSSES = {"ce-mean": nn.CrossEntropyLoss(), "mse-sum": nn.MSELoss(reduction="sum")}


def _setup(key, loss_key, N):
    build, shape = MODELS[key]
    torch.manual_seed(0)
    model = build().double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N, *shape, generator=generator, dtype=torch.float64)
    t = (torch.randint(3, (N,), generator=generator) if loss_key.startswith("ce")
         else torch.randn(N, 3, generator=generator, dtype=torch.float64))
    return model, x, t, LOSSES[loss_key]


@pytest.mark.parametrize("loss_key", list(LOSSES))
@pytest.mark.parametrize("key", list(MODELS))
def test_ops_are_exact(key, loss_key):
    assert_dense_exact(*_setup(key, loss_key, 3))


def test_example_cnn1d_with_uneven_adaptive_pooling_is_exact():
    spec = load_model_file(Path(__file__).parents[1] / "examples" / "models" / "cnn1d_fashion_mnist.py")
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, *spec.example_input.shape[1:], generator=generator, dtype=torch.float64)
    assert_dense_exact(spec.model.double(), x, torch.randint(10, (3,), generator=generator), spec.loss_fn)


@pytest.mark.parametrize("options", [dict(kernel_size=2, stride=2, padding=1, ceil_mode=True),
                                     dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
                                     dict(kernel_size=3, stride=3, padding=1, ceil_mode=True, count_include_pad=False),
                                     dict(kernel_size=2, stride=1)])
@pytest.mark.parametrize("size", [5, 6, 8])
def test_pool_windows_are_torchs(size, options):
    x = torch.randn(1, 1, size, dtype=torch.float64)
    windows = avg_pool_windows(size, options["kernel_size"], options["stride"], options.get("padding", 0),
                               options.get("ceil_mode", False), options.get("count_include_pad", True))
    mine = torch.stack([x[..., a:b].sum(-1) / d for a, b, d in windows], -1)
    assert torch.allclose(mine, F.avg_pool1d(x, **options))
    out = 3 if size > 3 else 2
    adaptive = torch.stack([x[..., a:b].sum(-1) / d for a, b, d in adaptive_windows(size, out)], -1)
    assert torch.allclose(adaptive, F.adaptive_avg_pool1d(x, out))


class NanoAttentionShapes(nn.Module):
    """nanoGPT's shape handling: sizes from x.size(), a causal-mask buffer sliced by T, views with C // nh."""

    def __init__(self, d=8, heads=2, block=6):
        super().__init__()
        self.heads = heads
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))
        self.proj = nn.Conv1d(d, d, 1)
        self.out = nn.Linear(4 * d, 3)

    def forward(self, x):                                            # (B, T, C)
        B, T, C = x.size()
        assert T <= self.bias.shape[-1]
        q = torch.tanh(self.proj(x.transpose(1, 2))).transpose(1, 2)  # (B, T, C)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        mask = self.bias[:, :, :T, :T]                               # a constant of the example's T
        y = q.transpose(1, 2).contiguous().view(B, T, C) * (1.0 / mask.shape[-1] ** 0.5)
        return self.out(y.reshape(B, -1))


def test_nanogpt_style_shapes_trace_and_stay_batch_generic():
    torch.manual_seed(0)
    model = NanoAttentionShapes().double()
    x = torch.randn(5, 4, 8, dtype=torch.float64)
    t = torch.randint(3, (5,))
    module = hbpc.compile_model(model, x[:2], nn.CrossEntropyLoss())
    curvature = module.Curvature(model)
    loss = curvature.forward_backward(x, t)
    assert torch.allclose(loss, nn.CrossEntropyLoss()(model(x), t), atol=1e-12)


def test_nanogpt_attention_compiles():
    """nanoGPT's attention code (split, heads, a causal buffer sliced by T, softmax) on (N, T, C) compiles."""
    path = Path(__file__).parents[1] / "examples" / "models" / "gpt_char.py"
    spec = importlib.util.spec_from_file_location("_gpt_char_attention", path)
    gpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpt)
    model = nn.Sequential(gpt.CausalSelfAttention(width=8, heads=2, block=6), nn.Flatten(), nn.Linear(32, 3))
    module = hbpc.compile_model(model, torch.zeros(2, 4, 8), nn.CrossEntropyLoss())  # verified against autograd
    for op in ("matmul", "masked_fill", "softmax"):
        assert f" = {op}(" in module.__doc__


@pytest.mark.parametrize("forward, fragment", [
    (lambda x, m: x.view(-1, 2).sum(1, keepdim=True).view(4, -1), "does not keep the batch"),
    (lambda x, m: x.sum(), "does not keep the batch"),
    (lambda x, m: x[0], "indexing the batch axis"),
    (lambda x, m: x[:, [0, 2]], "indexing with tensors, lists or booleans"),
    (lambda x, m: x.permute(1, 0), "keep the batch axis first"),
    (lambda x, m: x.transpose(0, 1), "is the batch axis"),
    (lambda x, m: x.mean(0), "is the batch axis"),
    (lambda x, m: x + m.fc.weight[:, 0], "unsupported op 'getitem'"),  # a parameter sliced
])
def test_shape_ops_on_the_batch_and_sliced_parameters_are_refused(forward, fragment):
    """The example batch (4) equals the feature size, so only the ops' own checks can tell the axes apart."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return forward(self.fc(x), self)

    with pytest.raises(hbpc.HbpcError, match=fragment):
        hbpc.compile_model(Model(), torch.zeros(4, 4), nn.CrossEntropyLoss())


def test_rms_norm_without_eps_is_refused_clearly():
    model = nn.Sequential(nn.Linear(4, 4), nn.RMSNorm(4), nn.Linear(4, 3))
    with pytest.raises(hbpc.HbpcError, match="eps is None; set it to a number"):
        hbpc.compile_model(model, torch.zeros(2, 4), nn.CrossEntropyLoss())


def test_batch_norm_in_training_mode_is_still_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).train()
    with pytest.raises(hbpc.HbpcError, match="couples the samples"):
        hbpc.compile_model(model, torch.zeros(2, 4), nn.CrossEntropyLoss())


class ChainOfShapeOps(nn.Module):
    """A chain (for the per-sample reference recursion): transpose, strided slice, permute, GroupNorm, uneven
    adaptive pooling, RMSNorm, mean over an axis."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 2)
        self.group_norm = nn.GroupNorm(2, 4)
        self.rms_norm = nn.RMSNorm(3, eps=1e-5)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):                                         # (N, 2, 11)
        h = torch.tanh(self.conv(x)).transpose(1, 2)[:, ::3]      # (N, 4, 4)
        h = self.group_norm(torch.sigmoid(h).permute(0, 2, 1))    # (N, 4, 4)
        h = self.rms_norm(torch.tanh(F.adaptive_avg_pool1d(h, 3)))  # (N, 4, 3)
        return self.fc(h.mean(dim=1))


@pytest.mark.parametrize("flags", [(True, True), (False, False)])
@pytest.mark.parametrize("curvature_name", ["hessian", "ggn", "pch-abs", "pch-clip"])
def test_blocks_match_per_sample_reference(curvature_name, flags):
    torch.manual_seed(0)
    model = ChainOfShapeOps().double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 11, generator=generator, dtype=torch.float64)
    t = torch.randint(3, (3,), generator=generator)
    loss_fn = nn.CrossEntropyLoss()
    curvature = hbpc.compile_model(model, x, loss_fn).Curvature(model)
    curvature.forward_backward(x, t)
    expected = hbp_blocks(model, loss_fn, x, t, curvature_name, *flags)
    blocks = curvature.blocks(curvature_name, *flags)
    exact = recursion_blocks(model, loss_fn, x, t, curvature_name)
    products = curvature.block_products(curvature_name)
    for name, p in model.named_parameters():
        assert torch.allclose(blocks[name].to_dense(), expected[name], atol=1e-10), name
        basis = torch.eye(p.numel(), dtype=p.dtype).reshape(-1, *p.shape)
        assert torch.allclose(products[name](basis).reshape(p.numel(), -1), exact[name], atol=1e-10), name
