"""Random chain models for architecture fuzzing (`tests/test_fuzz.py`, `make fuzz`).

A `Case` is a plain, printable description of one model: its per-sample input
shape, a list of layers (each `(kind, options)`), the loss and a seed. Cases are
drawn shape-aware, so every layer receives a shape it accepts, every per-sample
tensor stays small (at most `MAX_FEATURES` entries, parameters at most
`MAX_PARAMS`) and dense autograd references stay cheap.

`generate(chooser)` draws a case from any source of choices: `HypothesisChooser`
(inside `@st.composite`, so hypothesis can shrink a failure to a minimal model)
or `RandomChooser` (a `random.Random`, for surveys). `check_case(case)` compiles the
model with `hbpc.compile_model` and compares, in float64,

* the loss and `p.grad` of `forward_backward` with autograd,
* `block_products(c)` for all four curvatures at N = 1 and N = `case.batch` with
  the exact recursion of `reference.recursion_blocks`,
* `blocks(c, *flags)` at N = 1 for `hessian` and `ggn` and all four flag
  combinations with the true Hessian / GGN blocks (and `block @ v`, Kronecker factors),
* `blocks(case.hbp_mode, *case.hbp_flags)` at N = `case.batch` with `reference.hbp_blocks`.

A case with `kinks=True` sits on the kinks of ReLU, ELU, SELU, LeakyReLU and Hardtanh (`KINKS`): every
other output of a Linear/Conv2d that feeds such an activation gets zero weights and a bias at a kink (or
1e-12 beside it), and every other input entry is a kink value, so the derivatives there are compared with
the values torch's autograd uses (docs/curvature.md, "Kinks").

Run `python tests/fuzz_models.py [COUNT] [SEED] [--include-known]` for a survey that keeps
going after failures and prints each one with its op sequence and shapes.
"""
import itertools
import random
import sys
import traceback
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import MODES, ggn_block, hbp_blocks, hessian_block, recursion_blocks  # noqa: E402

MAX_FEATURES = 64  # per-sample numel of any tensor in the chain
MAX_PARAMS = 150  # numel of any parameter
ACTIVATIONS = ("sigmoid", "tanh", "relu")
# The other elementwise rules, as module code with their hyper-parameter variants.
OTHER_ACTIVATIONS = {
    "elu": ("nn.ELU()", "nn.ELU(alpha=0.5)"),
    "selu": ("nn.SELU()",),
    "leaky_relu": ("nn.LeakyReLU()", "nn.LeakyReLU(0.2)"),
    "softplus": ("nn.Softplus()", "nn.Softplus(beta=2.0)"),
    "gelu": ("nn.GELU()", "nn.GELU(approximate='tanh')"),
    "silu": ("nn.SiLU()",),
    "mish": ("nn.Mish()",),
    "logsigmoid": ("nn.LogSigmoid()",),
    "softsign": ("nn.Softsign()",),
    "hardtanh": ("nn.Hardtanh()", "nn.Hardtanh(-0.5, 2.0)"),
    "identity": ("nn.Identity()",),
}
_PARAMETRIZED = ("linear", "conv2d")
# Where the piecewise activations switch branches: layer kind or activation code -> kink points.
KINKS = {"relu": (0.0,), "nn.ELU()": (0.0,), "nn.ELU(alpha=0.5)": (0.0,), "nn.SELU()": (0.0,), "nn.LeakyReLU()": (0.0,),
         "nn.LeakyReLU(0.2)": (0.0,), "nn.Hardtanh()": (-1.0, 1.0), "nn.Hardtanh(-0.5, 2.0)": (-0.5, 2.0)}
KINK_OFFSETS = (0.0, 1e-12, -1e-12)  # on the kink, just above, just below
FLAGS = tuple(itertools.product((True, False), repeat=2))
# Losses: rule key -> (module, option variants). Cross-entropy takes class indices, the others a
# dense target shaped like the output (in [0, 1) for BCE).
LOSSES = {
    "cross_entropy": ("CrossEntropyLoss", ((), (("label_smoothing", 0.1),))),
    "mse": ("MSELoss", ((),)),
    "bce_with_logits": ("BCEWithLogitsLoss", ((),)),
    "huber": ("HuberLoss", ((), (("delta", 0.5),))),
    "smooth_l1": ("SmoothL1Loss", ((), (("beta", 0.3),))),
}


@dataclass(frozen=True)
class Case:
    """One fuzz model. `layers` is a tuple of `(kind, options)` with `options` a tuple of `(key, value)`."""

    input_shape: tuple
    layers: tuple
    loss: str
    reduction: str
    batch: int
    seed: int
    hbp_mode: str = "ggn"
    hbp_flags: tuple = (True, True)
    loss_options: tuple = ()
    kinks: bool = False

    def build(self) -> nn.Sequential:
        """The float64 `nn.Sequential`, parameters drawn from `torch.manual_seed(seed)` (then placed on kinks)."""
        torch.manual_seed(self.seed)
        model = nn.Sequential(*(make_layer(kind, dict(options)) for kind, options in self.layers)).double()
        if self.kinks:
            place_on_kinks(model, self.layers)
        return model

    def loss_fn(self) -> nn.Module:
        return getattr(nn, LOSSES[self.loss][0])(reduction=self.reduction, **dict(self.loss_options))

    def loss_code(self) -> str:
        options = "".join(f", {key}={value!r}" for key, value in self.loss_options)
        return f"nn.{LOSSES[self.loss][0]}(reduction={self.reduction!r}{options})"

    def shapes(self) -> list:
        """Per-sample shapes: the input, then every layer's output."""
        shapes, x = [self.input_shape], torch.zeros(1, *self.input_shape, dtype=torch.float64)
        with torch.no_grad():
            for layer in self.build():
                x = layer(x)
                shapes.append(tuple(x.shape[1:]))
        return shapes

    def data(self, batch_size: int, seed: int = 1):
        """Input `(N, *input_shape)` from a standard normal (no exact ties) and a matching target."""
        generator = torch.Generator().manual_seed(self.seed * 1000 + seed)
        x = torch.randn(batch_size, *self.input_shape, generator=generator, dtype=torch.float64)
        if self.kinks:  # every other entry on a kink of the first piecewise activation (or at 0)
            points = next((kink_points(layer) for layer in self.layers if kink_points(layer)), (0.0,))
            flat = x.view(-1)
            flat[::2] = torch.tensor(points, dtype=x.dtype).repeat(flat[::2].numel())[: flat[::2].numel()]
        out_shape = self.shapes()[-1]
        if self.loss == "cross_entropy":
            t = torch.randint(out_shape[0], (batch_size,), generator=generator)
        elif self.loss == "bce_with_logits":
            t = torch.rand(batch_size, *out_shape, generator=generator, dtype=torch.float64)
        else:
            t = torch.randn(batch_size, *out_shape, generator=generator, dtype=torch.float64)
        return x, t

    def describe(self) -> str:
        """The op sequence with shapes, and the code that rebuilds the model (a reproducer)."""
        shapes = self.shapes()
        lines = [f"input (N, {', '.join(map(str, self.input_shape))})"]
        for (kind, options), shape in zip(self.layers, shapes[1:]):
            lines.append(f"  -> {layer_code(kind, dict(options))}  => {shape}")
        lines.append(f"loss {self.loss_code()}, batch {self.batch}, seed {self.seed}, "
                     f"hbp check {self.hbp_mode} {self.hbp_flags}" + (", placed on kinks" if self.kinks else ""))
        lines.append("reproduce: " + self.code())
        return "\n".join(lines)

    def code(self) -> str:
        layers = ", ".join(layer_code(kind, dict(options)) for kind, options in self.layers)
        kinks = f"place_on_kinks(model, {self.layers!r}); " if self.kinks else ""
        return (f"torch.manual_seed({self.seed}); model = nn.Sequential({layers}).double(); {kinks}"
                f"example_input = torch.randn(2, {', '.join(map(str, self.input_shape))}, dtype=torch.float64); "
                f"loss_fn = {self.loss_code()}")


def make_layer(kind: str, o: dict) -> nn.Module:
    if kind == "linear":
        return nn.Linear(o["in"], o["out"], bias=o["bias"])
    if kind == "conv2d":
        return nn.Conv2d(o["in"], o["out"], o["kernel"], stride=o["stride"], padding=o["padding"],
                         dilation=o["dilation"], groups=o["groups"], bias=o["bias"])
    if kind == "maxpool2d":
        return nn.MaxPool2d(o["kernel"], stride=o["stride"], padding=o["padding"], dilation=o["dilation"])
    if kind == "avgpool2d":
        return nn.AvgPool2d(o["kernel"], stride=o["stride"], padding=o["padding"])
    if kind == "zeropad2d":
        return nn.ZeroPad2d(o["padding"])
    if kind == "flatten":
        return nn.Flatten()
    if kind == "activation":
        return eval(o["code"], {"nn": nn})  # one of the fixed strings in OTHER_ACTIVATIONS
    if kind == "layernorm":
        module = nn.LayerNorm(o["shape"], eps=o["eps"], elementwise_affine=o["affine"], bias=o["bias"])
        for p in module.parameters():  # random, not ones and zeros, so that the affine part matters
            nn.init.normal_(p, 1.0 if p is module.weight else 0.0, 0.5)
        return module
    return {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[kind]()


def kink_points(layer) -> tuple:
    """The kink points of a layer `(kind, options)`: () for a smooth layer."""
    kind, options = layer
    return KINKS.get(dict(options).get("code", kind), ())


def place_on_kinks(model: nn.Sequential, layers) -> None:
    """Every other output of a Linear/Conv2d before a piecewise activation: zero weights, bias on a kink (or 1e-12
    beside it), so every sample's pre-activation there is the kink itself (zero without a bias)."""
    with torch.no_grad():
        for i, (layer, following) in enumerate(zip(layers, layers[1:])):
            points = kink_points(following)
            if layer[0] not in _PARAMETRIZED or not points:
                continue
            values = [point + offset for offset in KINK_OFFSETS for point in points]
            module = model[i]
            for j in range(0, module.weight.shape[0], 2):
                module.weight[j] = 0.0
                if module.bias is not None:
                    module.bias[j] = values[(j // 2) % len(values)]


def layer_code(kind: str, o: dict) -> str:
    if kind == "linear":
        return f"nn.Linear({o['in']}, {o['out']}, bias={o['bias']})"
    if kind == "conv2d":
        return (f"nn.Conv2d({o['in']}, {o['out']}, {o['kernel']}, stride={o['stride']}, padding={o['padding']}, "
                f"dilation={o['dilation']}, groups={o['groups']}, bias={o['bias']})")
    if kind == "maxpool2d":
        return f"nn.MaxPool2d({o['kernel']}, stride={o['stride']}, padding={o['padding']}, dilation={o['dilation']})"
    if kind == "avgpool2d":
        return f"nn.AvgPool2d({o['kernel']}, stride={o['stride']}, padding={o['padding']})"
    if kind == "zeropad2d":
        return f"nn.ZeroPad2d({o['padding']})"
    if kind == "activation":
        return o["code"]
    if kind == "layernorm":
        return f"nn.LayerNorm({o['shape']}, eps={o['eps']}, elementwise_affine={o['affine']}, bias={o['bias']})"
    return {"flatten": "nn.Flatten()", "relu": "nn.ReLU()", "sigmoid": "nn.Sigmoid()", "tanh": "nn.Tanh()"}[kind]


# ---------------------------------------------------------------- drawing


class RandomChooser:
    """Choices from a `random.Random`."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def int(self, lo, hi):
        return self.rng.randint(lo, hi)

    def choice(self, options):
        return self.rng.choice(list(options))

    def bool(self):
        return self.rng.random() < 0.5


class HypothesisChooser:
    """Choices from hypothesis' `draw` (integers shrink to `lo`, choices to the first option)."""

    def __init__(self, draw):
        from hypothesis import strategies as st

        self.draw, self.st = draw, st

    def int(self, lo, hi):
        return self.draw(self.st.integers(lo, hi))

    def choice(self, options):
        return self.draw(self.st.sampled_from(list(options)))

    def bool(self):
        return self.draw(self.st.booleans())


def _pair(ch, lo, hi):
    """An int or, half of the time, a pair `(h, w)` (rectangular kernels, strides, paddings)."""
    if ch.bool():
        return ch.int(lo, hi)
    return (ch.int(lo, hi), ch.int(lo, hi))


def _half(kernel):
    """Pool paddings up to half the kernel (what torch accepts), shaped like `kernel`."""
    return kernel // 2 if isinstance(kernel, int) else (kernel[0] // 2, kernel[1] // 2)


def _pool_padding(ch, kernel):
    limit = _half(kernel)
    if isinstance(limit, int):
        return ch.int(0, limit)
    return (ch.int(0, limit[0]), ch.int(0, limit[1]))


def _out_shape(kind, options, shape):
    """Per-sample output shape of a layer, or None if torch refuses the input or the output is not
    finite (a dilated max-pool window that lies entirely in the padding gives -inf)."""
    try:
        with torch.no_grad():
            y = make_layer(kind, options)(torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)))
    except (RuntimeError, ValueError):
        return None
    return tuple(y.shape[1:]) if torch.isfinite(y).all() else None


def _largest_parameter(kind, o):
    if kind == "linear":
        return o["in"] * o["out"]
    kernel = o["kernel"] if isinstance(o["kernel"], tuple) else (o["kernel"], o["kernel"])
    return o["out"] * (o["in"] // o["groups"]) * kernel[0] * kernel[1]


def _draw_layer(ch, shape):
    """One layer that accepts `shape`, or None when the drawn options do not fit."""
    image = len(shape) == 3
    # Repeated entries weigh the draw (and hypothesis shrinks towards the first one).
    if image:
        kinds = ["conv2d", "relu", "maxpool2d", "avgpool2d", "zeropad2d", "sigmoid", "tanh", "conv2d", "maxpool2d",
                 "activation", "conv2d", "zeropad2d", "flatten", "layernorm"]
    else:
        kinds = ["linear", "relu", "sigmoid", "tanh", "linear", "activation", "flatten", "layernorm"]
    kind = ch.choice(kinds)
    options = {}
    if kind == "linear":
        options = {"in": shape[0], "out": ch.int(1, 6), "bias": ch.bool()}
    elif kind == "conv2d":
        channels = shape[0]
        groups = ch.choice([g for g in range(1, channels + 1) if channels % g == 0])
        options = {"in": channels, "out": groups * ch.int(1, max(1, 4 // groups)), "kernel": _pair(ch, 1, 3),
                   "stride": _pair(ch, 1, 2), "padding": _pair(ch, 0, 2), "dilation": _pair(ch, 1, 2),
                   "groups": groups, "bias": ch.bool()}
    elif kind in ("maxpool2d", "avgpool2d"):
        kernel = _pair(ch, 1, 3)
        options = {"kernel": kernel, "stride": _pair(ch, 1, 3), "padding": _pool_padding(ch, kernel)}
        if kind == "maxpool2d":
            options["dilation"] = _pair(ch, 1, 2)
    elif kind == "activation":
        options = {"code": ch.choice(ch.choice(list(OTHER_ACTIVATIONS.values())))}
    elif kind == "zeropad2d":
        options = {"padding": ch.int(0, 2) if ch.bool() else tuple(ch.int(0, 2) for _ in range(4))}
    elif kind == "layernorm":  # over the trailing 1 to 3 dimensions, with weight and bias, weight only or neither
        options = {"shape": shape[-ch.int(1, len(shape)):], "eps": ch.choice([1e-5, 0.1]), "affine": ch.bool(),
                   "bias": ch.bool()}
    out = _out_shape(kind, options, shape)
    if out is None or 0 in out or prod(out) > MAX_FEATURES:
        return None, shape
    if kind in _PARAMETRIZED and _largest_parameter(kind, options) > MAX_PARAMS:
        return None, shape
    return (kind, tuple(options.items())), out


def generate(ch) -> Case:
    """A random chain model whose every layer fits the shape it receives."""
    loss = ch.choice(list(LOSSES))
    loss_options = ch.choice(LOSSES[loss][1])
    reduction = ch.choice(["mean", "sum"])
    if ch.bool():
        channels, height = ch.int(1, 3), ch.int(2, 6)
        shape = (channels, height, ch.int(2, min(6, MAX_FEATURES // (channels * height))))
    else:
        shape = (ch.int(1, 8),)
    input_shape, layers = shape, []
    for _ in range(ch.int(1, 6)):
        layer, shape = _draw_layer(ch, shape)
        if layer is not None:
            layers.append(layer)
    has_params = any(kind in _PARAMETRIZED for kind, _ in layers)
    # The head: cross-entropy needs (N, C) logits with C >= 2; every model needs a parameter.
    needs_flat = loss == "cross_entropy" or not has_params or ch.bool()
    if needs_flat and len(shape) == 3:
        layers.append(("flatten", ()))
        shape = (prod(shape),)
    if len(shape) == 1 and (not has_params or (loss == "cross_entropy" and shape[0] < 2) or ch.bool()):
        out = ch.int(2, 4) if loss == "cross_entropy" else ch.int(1, 4)
        layers.append(("linear", (("in", shape[0]), ("out", out), ("bias", ch.bool()))))
        if ch.int(0, 3) == 0:
            layers.append((ch.choice(ACTIVATIONS), ()))
    return Case(input_shape, tuple(layers), loss, reduction, batch=ch.int(2, 3), seed=ch.int(0, 2**16),
                hbp_mode=ch.choice(MODES), hbp_flags=ch.choice(FLAGS), loss_options=loss_options,
                kinks=ch.int(0, 3) == 0)


def cases():
    """The hypothesis strategy of fuzz cases."""
    from hypothesis import strategies as st

    return st.composite(lambda draw: generate(HypothesisChooser(draw)))()


# ---------------------------------------------------------------- known compiler bugs

# Each known bug has a reason, a minimal reproducer and a predicate `hits(case)`: fuzzing skips the
# cases it matches (unless HBPC_FUZZ_KNOWN_BUGS=1) and keeps looking for new bugs, and `test_fuzz.py`
# runs every reproducer as xfail(strict=True). Once a bug is fixed, move its reproducer to REGRESSIONS.

def _linear(i, o, bias=True):
    return ("linear", (("in", i), ("out", o), ("bias", bias)))


@dataclass(frozen=True)
class KnownBug:
    reason: str
    reproducer: Case
    hits: object  # case -> bool


KNOWN_BUGS = {}

# Minimal reproducers of bugs fuzzing found and that are fixed: `test_fuzz.py` checks them on every run.
REGRESSIONS = {
    # BCEWithLogits on an image-shaped output: the loss Hessian product mixed flattened z with unflattened v.
    "z-dependent-loss-hessian-on-image-output": Case(
        (1, 2, 2), (("conv2d", (("in", 1), ("out", 1), ("kernel", 1), ("stride", 1), ("padding", 0), ("dilation", 1),
                                ("groups", 1), ("bias", True))),), "bce_with_logits", "mean", 2, 0),
    # forward_backward raised NameError: name 'g_sigmoid0' is not defined.
    "sigmoid-before-the-first-parameter": Case((2,), (("sigmoid", ()), _linear(2, 2)), "cross_entropy", "mean", 2, 0),
    # KroneckerBlock.to_dense(): torch.kron on a transposed factor ("view size is not compatible").
    "flatten-right-after-linear": Case((3,), (_linear(3, 3, False), ("flatten", ()), _linear(3, 2)), "cross_entropy",
                                       "mean", 2, 0),
    "linear-with-one-output-inside": Case((4,), (_linear(4, 2), _linear(2, 1)), "mse", "mean", 3, 0),
    # ELU/SELU φ″(0) was α (the x <= 0 branch of the derived Piecewise) where torch autograd gives 0; exact zeros
    # from a ReLU reached the summed residual of HBP blocks at N > 1.
    "elu-second-derivative-at-zero": Case((2,), (_linear(2, 3, False), ("relu", ()), ("activation", (("code", "nn.ELU()"),))),
                                          "cross_entropy", "mean", 2, 0, hbp_mode="hessian"),
}


def known_bugs(case: Case) -> list:
    """Names of the known compiler bugs that `case` runs into by shape pattern."""
    return [name for name, bug in KNOWN_BUGS.items() if bug.hits(case)]


# ---------------------------------------------------------------- checking


def _close(actual, expected):
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    return actual.shape == expected.shape and torch.allclose(actual, expected, rtol=1e-7, atol=1e-10 * scale)


def _basis(p):
    return torch.eye(p.numel(), dtype=p.dtype).reshape(-1, *p.shape)


def _dense(product, p):
    return product(_basis(p)).reshape(p.numel(), p.numel())


def _bound(case, module, N):
    model = case.build()
    x, t = case.data(N)
    curvature = module.Curvature(model)
    loss = curvature.forward_backward(x, t)
    reference = case.build()
    expected = case.loss_fn()(reference(x), t)
    grads = torch.autograd.grad(expected, list(reference.parameters()))
    assert _close(loss.detach(), expected.detach()), f"N={N}: loss {loss} != autograd {expected}"
    for (name, p), g in zip(model.named_parameters(), grads):
        assert _close(p.grad, g), f"N={N}: p.grad of {name} differs from autograd"
    return model, x, t, curvature


class _Checks:
    """Runs comparisons; raises at the first failure, or (`collect=True`) records every failure."""

    def __init__(self, collect: bool):
        self.collect, self.count, self.failures = collect, 0, []

    def __call__(self, what, check, *args):
        self.count += 1
        try:
            check(*args)
        except Exception as error:
            if not self.collect:
                raise
            self.failures.append(f"{what}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


def check_case(case: Case, collect: bool = False):
    """Compile `case` and compare everything with the references.

    Returns the number of comparisons, or with `collect=True` the pair (count, failures) where
    failures lists every comparison that failed or raised (instead of raising at the first).
    """
    import hbpc

    checks = _Checks(collect)
    example, _ = case.data(2, seed=0)
    module = hbpc.compile_model(case.build(), example, case.loss_fn())
    for N in (1, case.batch):
        model, x, t, curvature = _bound(case, module, N)
        for mode in MODES:
            expected = recursion_blocks(case.build(), case.loss_fn(), x, t, mode)
            for name, p in model.named_parameters():
                checks(f"N={N}: block_products({mode!r})[{name!r}]", _check_product, curvature, mode, name, p,
                       expected[name])
        if N == 1:
            for mode, exact in (("hessian", hessian_block), ("ggn", ggn_block)):
                truth = {name: exact(case.build(), case.loss_fn(), x, t, name) for name, _ in model.named_parameters()}
                for flags in FLAGS:
                    for name, p in model.named_parameters():
                        checks(f"N=1: blocks({mode!r}, *{flags})[{name!r}] vs the true block", _check_block,
                               curvature, mode, flags, name, p, truth[name])
        else:
            expected = hbp_blocks(case.build(), case.loss_fn(), x, t, case.hbp_mode, *case.hbp_flags)
            for name, p in model.named_parameters():
                checks(f"N={N}: blocks({case.hbp_mode!r}, *{case.hbp_flags})[{name!r}] vs hbp_blocks", _check_block,
                       curvature, case.hbp_mode, case.hbp_flags, name, p, expected[name])
    return (checks.count, checks.failures) if collect else checks.count


def _check_product(curvature, mode, name, p, expected):
    assert _close(_dense(curvature.block_products(mode)[name], p), expected), "differs from the exact recursion"


def _check_block(curvature, mode, flags, name, p, expected):
    block = curvature.blocks(mode, *flags)[name]
    assert block.shape == (p.numel(), p.numel()), f"shape {block.shape}"
    assert _close(_dense(block.__matmul__, p), expected), "block @ v differs from the reference"
    if block.kronecker_factors is not None:
        A, B = block.kronecker_factors
        assert _close(torch.kron(A.contiguous(), B.contiguous()), expected), "kron(*kronecker_factors) differs"
    assert _close(block.to_dense(), expected), "to_dense() differs from the reference"


# ---------------------------------------------------------------- survey


def survey(count: int, seed: int = 0, skip_known: bool = True):
    """Check `count` random cases (skipping known bugs) and print every failure with a reproducer."""
    torch.set_num_threads(1)
    rng, failures, checks, skipped, kinds = random.Random(seed), [], 0, {}, {}
    checked = 0
    while checked < count:
        case = generate(RandomChooser(rng))
        hit = known_bugs(case)
        if skip_known and hit:
            for name in hit:
                skipped[name] = skipped.get(name, 0) + 1
            continue
        checked += 1
        for kind, _ in case.layers:
            kinds[kind] = kinds.get(kind, 0) + 1
        try:
            count_, problems = check_case(case, collect=True)
            checks += count_
        except Exception as error:  # noqa: BLE001 - a survey reports everything
            problems = ["".join(traceback.format_exception_only(type(error), error)).strip()]
        if problems:
            failures.append((case, problems))
            listed = "\n  ".join(problems[:6]) + (f"\n  ... {len(problems) - 6} more" if len(problems) > 6 else "")
            print(f"FAIL #{checked}:\n  {listed}\n{case.describe()}\n", flush=True)
    print(f"{count} models checked, {checks} comparisons, {len(failures)} failing models; "
          f"skipped for known bugs: {skipped}; layers drawn: {kinds}")
    return failures


if __name__ == "__main__":
    arguments = [arg for arg in sys.argv[1:] if not arg.startswith("--")]
    survey(int(arguments[0]) if arguments else 100, int(arguments[1]) if len(arguments) > 1 else 0,
           skip_known="--include-known" not in sys.argv)
