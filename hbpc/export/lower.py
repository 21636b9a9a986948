"""Trace a model with torch.fx (sizes specialized to the example input: ``trace.py``) and lower it to the IR:
a ``networkx.DiGraph`` of ``hbpc.ir.Node``s (fields and shapes: ``hbpc/ir.py``). Ops that are several existing
rules in a row (shape ops, GroupNorm, uneven pooling) become several IR nodes (``chains.py``).
"""
import contextlib
import hashlib
import io
import json
import re
from dataclasses import replace
from types import SimpleNamespace

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from hbpc import ir
from hbpc.errors import HbpcError
from hbpc.rules import LOSS_TABLE, TABLE, USER_KEYS
from hbpc.rules.spec import Elementwise, Normalization

from .attention import attention_chain, mask_constants
from .chains import (adaptive_windows, avg_pool_windows, broadcast_parameter, crop_rows,
                     group_norm_chain, is_split, positional_rows, shape_chain, window_branches)
from .trace import HBPC_DIR, ShapeTracer, forget_values

_SHAPE_ONLY = {"size", "getitem", "getattr", "dim"}


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _single(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _triple(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value, value)


def _module_hyper(key, module):
    """Hyper-parameters of a module form, refusing options the rules do not cover."""
    size = {"1d": _single, "3d": _triple}.get(key[-2:], _pair)
    if key in ("conv2d", "conv1d", "conv3d"):
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise ValueError("only numeric zero padding is supported (not padding='same'/'valid' or padding_mode)")
        return {"kernel_size": size(module.kernel_size), "stride": size(module.stride),
                "padding": size(module.padding), "dilation": size(module.dilation), "groups": module.groups}
    if key in ("conv_transpose2d", "conv_transpose1d", "conv_transpose3d"):
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise ValueError("only numeric zero padding is supported (not padding_mode)")
        return {"kernel_size": size(module.kernel_size), "stride": size(module.stride),
                "padding": size(module.padding), "output_padding": size(module.output_padding),
                "dilation": size(module.dilation), "groups": module.groups}
    if key in ("max_pool2d", "max_pool1d", "max_pool3d"):
        if module.return_indices:
            raise ValueError("return_indices=True is not supported")
        return {"kernel_size": size(module.kernel_size), "stride": size(module.stride or module.kernel_size),
                "padding": size(module.padding), "dilation": size(module.dilation),
                **({"ceil_mode": True} if module.ceil_mode else {})}
    if key in ("avg_pool2d", "avg_pool1d", "avg_pool3d"):
        if module.ceil_mode or not module.count_include_pad or getattr(module, "divisor_override", None):
            raise ValueError("only ceil_mode=False, count_include_pad=True, divisor_override=None are supported")
        return {"kernel_size": size(module.kernel_size), "stride": size(module.stride or module.kernel_size),
                "padding": size(module.padding)}
    if key == "pad":
        if any(p < 0 for p in module.padding):
            raise ValueError("negative padding (cropping) is not supported")
        return {"padding": tuple(module.padding)}
    if key == "batch_norm":
        if module.training:
            raise ValueError("BatchNorm in training mode normalises with batch statistics, which couples the "
                             "samples; call model.eval() before compiling (hbpc compiles the eval-mode map)")
        if not module.affine or not module.track_running_stats:
            raise ValueError("BatchNorm needs affine=True and track_running_stats=True")
        return {"eps": module.eps}
    if key == "layer_norm":
        shape = _single(getattr(module, "normalized_shape", None))
        if not all(isinstance(size, int) for size in shape):
            raise ValueError("layer_norm needs normalized_shape as constant sizes, e.g. (C,), not sizes read from a "
                             "tensor's shape")
        return {"normalized_shape": shape, "eps": float(module.eps)}
    if key == "embedding":
        options = [name for name, default in _EMBEDDING_DEFAULTS.items() if getattr(module, name, default) != default]
        if options:
            raise ValueError(f"embedding with {', '.join(options)} is not supported (padding_idx zeroes a row's "
                             "gradient, which is not the derivative of the lookup); use nn.Embedding(V, D) without them")
        return {"num_embeddings": int(getattr(module, "num_embeddings", 0) or module.weight.shape[0])}
    if key == "identity" and getattr(module, "training", False) and getattr(module, "p", 0) > 0:
        raise ValueError("dropout in training mode is random, so it has no curvature; call model.eval() before "
                         "compiling and training with curvature")
    return {}


def _adaptive_output_size(node, op, module, x_shape):
    """The output size of AdaptiveAvgPool1d/2d along its pooled (trailing) per-sample axes; None keeps an axis."""
    size = module.output_size if node.op == "call_module" else (node.kwargs.get("output_size") or node.args[1])
    rank = 1 if op.endswith("1d") else 2
    out = _single(size) if rank == 1 else _pair(size)
    return tuple(x if o is None else o for o, x in zip(out, x_shape[-rank:]))


def _adaptive_as_avg_pool(node, op, module, x_shape):
    """Adaptive average pooling whose output size divides the input: an average pooling, kernel = stride = in / out."""
    out = _adaptive_output_size(node, op, module, x_shape[1:])
    kernel = tuple(x // o for x, o in zip(x_shape[-len(out):], out))
    return {"kernel_size": kernel, "stride": kernel, "padding": (0,) * len(out)}


_EMBEDDING_DEFAULTS = dict(padding_idx=None, max_norm=None, scale_grad_by_freq=False, sparse=False)

# Positional parameters of the functional forms, named like the module attributes they stand for.
_FUNCTIONAL_ARGS = {
    "embedding": ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
    "linear": ("input", "weight", "bias"),
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv1d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv3d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv_transpose2d": ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    "conv_transpose3d": ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    "conv_transpose1d": ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    "max_pool2d": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "max_pool1d": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "max_pool3d": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "avg_pool2d": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    "avg_pool1d": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    "avg_pool3d": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    "pad": ("input", "padding", "mode", "value"),
    "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
}
_FUNCTIONAL_DEFAULTS = {
    "embedding": dict(norm_type=2.0, **_EMBEDDING_DEFAULTS),
    "conv2d": dict(bias=None, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"),
    "conv1d": dict(bias=None, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"),
    "conv3d": dict(bias=None, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"),
    "conv_transpose2d": dict(bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1,
                             padding_mode="zeros"),
    "conv_transpose3d": dict(bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1,
                             padding_mode="zeros"),
    "conv_transpose1d": dict(bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1,
                             padding_mode="zeros"),
    "max_pool2d": dict(stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False),
    "max_pool1d": dict(stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False),
    "max_pool3d": dict(stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False),
    "avg_pool2d": dict(stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None),
    "avg_pool1d": dict(stride=None, padding=0, ceil_mode=False, count_include_pad=True),
    "avg_pool3d": dict(stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None),
    "pad": dict(mode="constant", value=None),
    "linear": dict(bias=None),
    "layer_norm": dict(weight=None, bias=None, eps=1e-5),
}


def _functional_call(key, node, module):
    """Hyper-parameters and parameter names of ``F.linear(x, self.weight, ...)``-style calls."""
    names = _FUNCTIONAL_ARGS[key]
    bound = {**_FUNCTIONAL_DEFAULTS[key], **dict(zip(names, node.args)), **node.kwargs}
    if key == "pad" and (bound["mode"] != "constant" or bound["value"] not in (None, 0, 0.0)):
        raise ValueError("only zero padding (mode='constant', value=0) is supported")
    params, shapes = {}, {}
    for role in ("weight", "bias"):
        arg = bound.get(role)
        if isinstance(arg, fx.Node):
            if arg.op != "get_attr":
                raise ValueError(f"the {role} must be a parameter of the model")
            try:
                params[role], shapes[role] = arg.target, tuple(module.get_parameter(arg.target).shape)
            except AttributeError:
                raise ValueError(f"the {role} must be a parameter of the model (`{arg.target}` is a buffer or "
                                 "constant)") from None
    if key.startswith("conv"):
        bound["kernel_size"] = shapes["weight"][2:]
    if key == "embedding":
        bound["num_embeddings"] = shapes["weight"][0]
    attrs = SimpleNamespace(**{k: v for k, v in bound.items() if not isinstance(v, fx.Node)})
    return _module_hyper(key, attrs), params, shapes


# Options that select another rule: (key, option, value) -> key.
_VARIANTS = {("gelu", "approximate", "tanh"): "gelu_tanh"}
_VARIANT_OPTIONS = {"gelu": {"approximate": "none"}}


def _variant(key, hyper):
    for option, value in hyper.items():
        if (key, option, value) in _VARIANTS:
            return _VARIANTS[(key, option, value)]
    return key


def _elementwise_hyper(rule, node, modules):
    """Hyper-parameter values of an activation from the module's attributes or the call's arguments."""
    names = {**rule.hyper, **_VARIANT_OPTIONS.get(rule.key, {})}
    if node.op == "call_module":
        module = modules[node.target]
        return {name: getattr(module, name, default) for name, default in names.items()}
    given = {**dict(zip(names, node.args[1:])), **node.kwargs}
    return {name: given.get(name, default) for name, default in names.items()}


# torch's own module classes: built-in rules match these by identity (nn.Tanh -> "tanh"), never a
# third-party class that happens to share a name (BackPACK's Pad is not nn.ZeroPad2d's "pad").
_TORCH_MODULES = frozenset(cls for cls in vars(nn).values() if isinstance(cls, type) and issubclass(cls, nn.Module))


def _module_op(module) -> str:
    """The op key of a module: torch's classes by their lower-cased name, other classes only through a user rule."""
    name = type(module).__name__.lower()
    if type(module) in _TORCH_MODULES or name in USER_KEYS:
        return name
    return f"{type(module).__module__}.{type(module).__name__}"  # no rule matches: reported as unsupported


def _op_name(node, modules):
    if node.op == "call_module":
        return _module_op(modules[node.target])
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target)).lower()
    if node.op == "call_method":
        return node.target.lower()
    return node.op


def _describe(node, modules):
    if node.op == "call_module":
        return f"{type(modules[node.target]).__module__}.{type(modules[node.target]).__name__} (self.{node.target})"
    if node.op == "call_function":
        return f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', node.target)}"
    return f"Tensor.{node.target}()"


def _source(node) -> str:
    if "hbpc_source" in node.meta:
        return node.meta["hbpc_source"]
    return f"module self.{node.target}" if node.op == "call_module" else "<unknown>"


def _identifier(name: str, prefix: str, taken: set) -> str:
    """A safe, unique Python identifier derived from an fx node name."""
    base = re.sub(r"\W", "_", name.encode("ascii", "replace").decode()).strip("_") or "node"
    if base[0].isdigit():
        base = f"{prefix}{base}"
    candidate, count = base, 1
    while candidate in taken:
        count += 1
        candidate = f"{base}_{count}"
    taken.add(candidate)
    return candidate


class _InterpretedGraphModule(fx.GraphModule):
    """A GraphModule that is only read and interpreted (ShapeProp), never called.

    It skips compiling ``forward`` from Python source: torch.fx writes ``self.<name>`` even for submodules named
    like keywords (``add_module("class", ...)``), whose source does not parse.
    """

    def recompile(self):
        return None


def _trace(model, example_input):
    tracer = ShapeTracer(example_input)
    try:
        graph = tracer.trace(model)
        module = _InterpretedGraphModule(tracer.root, graph, type(model).__name__)
    except Exception as error:
        cause = _root_cause(error)
        raise HbpcError(f"torch.fx could not trace the model: {type(cause).__name__}: {_first_line(cause)}",
                        _user_location(error, model),
                        "make forward traceable: no Python control flow on tensor values and no errors on "
                        "example_input") from None
    forget_values(module.graph, module)
    inputs = [node.name for node in module.graph.nodes if node.op == "placeholder"]
    if len(inputs) != 1:
        raise HbpcError(f"the model's forward pass failed on example_input: forward takes the inputs "
                        f"({', '.join(inputs)}), example_input is one tensor", f"{type(model).__name__}.forward",
                        "compile a model whose forward takes one tensor (wrap the others into the model)")
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(module).propagate(example_input)
    except Exception as error:
        cause = _root_cause(error)
        raise HbpcError(f"the model's forward pass failed on example_input: {type(cause).__name__}: "
                        f"{_first_line(cause)}", _failing_node(error, module) or _user_location(error, model),
                        "check example_input's shape (batch first) and dtype against the model") from None
    return module


def _failing_node(error, module):
    """``node `_0` (module self.0)`` for the node ShapeProp was running when it failed, if it says."""
    match = re.search(r"node=%?(\w+)", str(error))
    nodes = {node.name: node for node in module.graph.nodes}
    if match is None or match.group(1) not in nodes:
        return None
    node = nodes[match.group(1)]
    return f"node `{node.name}` at {_source(node)}"


def _root_cause(error):
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _first_line(error) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _user_location(error, model) -> str:
    """The deepest ``file:line`` of the traceback outside torch and hbpc, else ``Model.forward``."""
    import traceback

    frames = [f for e in (error, _root_cause(error)) for f in traceback.extract_tb(e.__traceback__)
              if "/torch/" not in f.filename and not f.filename.startswith(HBPC_DIR) and not f.filename.startswith("<")]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else type(model).__name__ + ".forward"


def _supported_list() -> str:
    return ", ".join(sorted({rule.key for rule in TABLE.values()}))


def _problems_fix(problems) -> str:
    """The supported ops and how to add one with --rules, if an op has no rule; else each problem names its fix."""
    unsupported = [re.match(r"unsupported op '([^']*)'", p) for p in problems]
    unsupported = [m.group(1) for m in unsupported if m]
    if not unsupported:
        return ""
    return (f"supported ops: {_supported_list()}; or add a rule in a file and pass it with --rules, e.g. "
            f"my_rules.py: `RULES = [Elementwise({unsupported[0]!r}, x / (1 + exp(-x)))]` (φ of x in sympy, see the "
            f"README's 'Adding an activation'), then `hbpc compile MODEL --rules my_rules.py -o OUT`")


def _param_roles(module):
    return {role: p for role, p in module.named_parameters(recurse=False)}


def _is_tensor(arg) -> bool:
    """A per-sample tensor computed by the model (not a parameter, constant, or parameter rows looked up)."""
    return (isinstance(arg, fx.Node) and arg.op != "get_attr" and "hbpc_parameter" not in arg.meta
            and isinstance(arg.meta.get("tensor_meta"), TensorMetadata))


def _positional_embedding(node, op, module, modules) -> bool:
    """Whether ``node`` is ``self.wpe(torch.arange(T))``, an embedding of a constant index: then it is its weight
    (all rows in order), marked ``hbpc_parameter`` and lowered where it is used as a learned positional parameter."""
    ids = node.args[0] if node.args else None
    if op != "embedding" or node.op != "call_module" or not isinstance(ids, fx.Node) or ids.op != "get_attr":
        return False
    value = module
    for part in ids.target.split("."):
        value = getattr(value, part)
    weight = modules[node.target].weight
    rows = len(value) if torch.is_tensor(value) and value.dim() == 1 else 0
    if not 0 < rows <= weight.shape[0] or not torch.equal(value.cpu(), torch.arange(rows)):
        raise ValueError(f"an embedding of a constant index is supported as its first rows in order "
                         f"(torch.arange(T), T <= num_embeddings = {weight.shape[0]}: a learned positional parameter), "
                         f"got an index of shape {tuple(value.shape) if torch.is_tensor(value) else value!r}")
    node.meta["hbpc_parameter"] = next(name for name, p in module.named_parameters() if p is weight)
    if rows < weight.shape[0]:
        node.meta["hbpc_rows"] = tuple(weight.shape)  # the first rows of the parameter: a chain where it is added
    return True


def _expanded_parameter(node, op, module) -> bool:
    """Whether ``node`` is a parameter expanded over the batch (``self.cls_token.expand(N, -1, -1)``): then it stands
    for the parameter (marked ``hbpc_parameter``), lowered where it is used (``torch.cat``, ``+``)."""
    source = node.args[0] if node.args else None
    if op != "expand" or not isinstance(source, fx.Node) or source.op != "get_attr":
        return False
    if source.target not in dict(module.named_parameters()):
        return False
    node.meta["hbpc_parameter"] = source.target
    return True


def _parameter_cat(node, op, module):
    """``torch.cat([p, x], dim)`` (or ``[x, p]``) for a parameter ``p`` expanded over the batch (a CLS token):
    ``(sources, steps)`` in attention.py's DAG form. The parameter's rows are a zero crop of ``x`` (``p``'s rows
    before or after the tokens, all padding) shifted by ``p`` (``entry_shift``: used once, not tied), then ``cat``;
    exact. None for any other op."""
    if op != "cat" or not isinstance(node.args[0], (list, tuple)) or len(node.args[0]) != 2:
        return None
    marked = [a for a in node.args[0] if isinstance(a, fx.Node) and "hbpc_parameter" in a.meta]
    tensors = [a for a in node.args[0] if _is_tensor(a)]
    if len(marked) != 1 or len(tensors) != 1:
        return None
    x_shape = tuple(tensors[0].meta["tensor_meta"].shape[1:])
    p_sample = tuple(marked[0].meta["tensor_meta"].shape[1:])
    name = marked[0].meta["hbpc_parameter"]
    dim = _cat_dim(node) % (len(x_shape) + 1)
    if dim == 0:
        raise ValueError("torch.cat along the batch dimension is not supported")
    rows = p_sample[dim - 1]
    crop, crop_hyper, zero_shape = crop_rows(x_shape, dim, rows)
    p_shape = tuple(module.get_parameter(name).shape)
    _, hyper, role = broadcast_parameter("add", zero_shape, p_shape)
    y_shape = tuple(x_shape[a] + rows if a == dim - 1 else x_shape[a] for a in range(len(x_shape)))
    first = node.args[0][0] is marked[0]
    steps = [(crop, crop_hyper, ["s0"], zero_shape),
             ("entry_shift", hyper, [0], zero_shape, {role: name}, {role: p_shape}),
             ("cat", {"dim": dim}, [1, "s0"] if first else ["s0", 1], y_shape)]
    return [tensors[0]], steps


def _scalar_op(op, node):
    """``x * c``, ``c * x``, ``x / c``, ``-x``, ``x + c``, ``x - c`` as the elementwise ``scale`` / ``shift`` rules."""
    numbers = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if op == "neg":
        return "scale", {"scale": -1.0}
    if len(numbers) != 1 or len(node.args) != 2:
        return None
    c = float(numbers[0])
    tensor_first = _is_tensor(node.args[0])
    if op == "mul":
        return "scale", {"scale": c}
    if op in ("truediv", "div") and tensor_first and c != 0:
        return "scale", {"scale": 1.0 / c}
    if op == "add":
        return "shift", {"shift": c}
    if op == "sub" and tensor_first:
        return "shift", {"shift": -c}
    return None


def _parameter_operand(node, module):
    """The name of the parameter a binary op reads directly (``x + self.pos``, ``x + self.wpe(arange)``), else None."""
    parameters = dict(module.named_parameters())
    names = [a.meta.get("hbpc_parameter", a.target) for a in node.args if isinstance(a, fx.Node)
             and (a.op == "get_attr" or "hbpc_parameter" in a.meta)]
    names = [name for name in names if name in parameters]
    return names[0] if len(names) == 1 and len(node.args) == 2 else None


def _cat_dim(node):
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return dim


def _lower_node(node, op, rule, tensor_args, modules, module, param_names):
    """(rule, hyper, params, param_shapes) of one fx node; raises ValueError for unsupported options."""
    hyper, params, param_shapes = {}, {}, {}
    if op in ("add", "mul") and len(tensor_args) == 1 and _parameter_operand(node, module) is not None:
        name = _parameter_operand(node, module)
        p_shape = tuple(module.get_parameter(name).shape)
        key, hyper, role = broadcast_parameter(op, tuple(tensor_args[0].meta["tensor_meta"].shape[1:]), p_shape)
        return TABLE[key], hyper, {role: name}, {role: p_shape}
    if op in ("mul", "truediv", "div", "add", "sub", "neg") and len(tensor_args) == 1:
        scalar = _scalar_op(op, node)
        if scalar is None:
            raise ValueError(f"'{op}' with these arguments is not supported")
        key, hyper = scalar
        return TABLE[key], hyper, params, param_shapes
    if op in ("adaptiveavgpool1d", "adaptive_avg_pool1d", "adaptiveavgpool2d", "adaptive_avg_pool2d"):
        module_or_none = modules.get(node.target) if node.op == "call_module" else None
        x_shape = tuple(tensor_args[0].meta["tensor_meta"].shape)
        hyper = _adaptive_as_avg_pool(node, op, module_or_none, x_shape)
        return TABLE[f"avg_pool{len(hyper['kernel_size'])}d"], hyper, params, param_shapes
    if rule is None:
        raise KeyError(op)
    if rule.key == "identity" and node.op == "call_function":
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        if training and p > 0:
            raise ValueError("dropout in training mode is random, so it has no curvature; pass training=False "
                             "(e.g. training=self.training with model.eval())")
    if isinstance(rule, Elementwise):
        hyper = _elementwise_hyper(rule, node, modules)
        rule = TABLE.get(_variant(rule.key, hyper), rule)
    elif rule.key == "cat":
        tensors = node.args[0]
        if not all(_is_tensor(a) for a in tensors):
            raise ValueError("torch.cat of non-tensors is not supported")
        dim = _cat_dim(node)
        if dim == 0 or dim == -len(tensor_args[0].meta["tensor_meta"].shape):
            raise ValueError("torch.cat along the batch dimension is not supported")
        hyper = {"dim": dim if dim > 0 else dim + len(tensor_args[0].meta["tensor_meta"].shape)}
    elif node.op == "call_module" and isinstance(rule, Normalization) and rule.key != "layer_norm":
        hyper, params, param_shapes = _user_normalization(rule, modules[node.target], param_names)
    elif node.op == "call_module":
        hyper = _module_hyper(rule.key, modules[node.target])
        roles = _param_roles(modules[node.target])
        params = {role: param_names[id(p)] for role, p in roles.items()}
        param_shapes = {role: tuple(p.shape) for role, p in roles.items()}
        buffers = {role: f"{node.target}.{role}" for role, b in modules[node.target].named_buffers(recurse=False)
                   if role in ("running_mean", "running_var")}
        if buffers:
            hyper = {**hyper, "buffers": buffers}
    elif rule.key in _FUNCTIONAL_ARGS:
        hyper, params, param_shapes = _functional_call(rule.key, node, module)
    if hyper.pop("ceil_mode", False):
        rule = TABLE[f"{rule.key}_ceil"]  # the last windows may pass the end: torch's own forward records them
    if rule.key == "linear" and len(tensor_args[0].meta["tensor_meta"].shape) != 2:
        rule = TABLE["shared_linear"]  # (N, *S, D): the weight is shared over the positions S
    per_sample_dims = len(tensor_args[0].meta["tensor_meta"].shape) - 1
    if isinstance(rule, Normalization) and len(hyper["normalized_shape"]) > per_sample_dims:
        raise ValueError(f"{rule.key} over the batch dimension couples the samples; normalize per-sample dimensions")
    arity = len(tensor_args)
    if rule.key == "add" and (arity != 2 or tensor_args[0].meta["tensor_meta"].shape
                              != tensor_args[1].meta["tensor_meta"].shape):
        raise ValueError("only the sum of two tensors of equal shape is supported (no broadcasting)")
    if rule.key not in ("add", "cat") and arity != 1:
        raise ValueError(f"'{op}' with {arity} tensor inputs is not supported")
    if rule.key == "identity" and op.startswith("dropout"):  # random in training mode: eval mode only
        hyper = {**hyper, "dropout": node.target if node.op == "call_module" else "*"}  # module path, * functional
    return rule, hyper, params, param_shapes


def _user_normalization(rule, module, param_names):
    """(hyper, params, shapes) of a module a user ``Normalization`` rule matches, read from its attributes.

    ``normalized_shape`` (the trailing per-sample dimensions normalized together) is required; the
    rule's hyper-parameters (e.g. ``eps``) come from attributes of the same names, else their defaults.
    """
    shape = getattr(module, "normalized_shape", None)
    shape = _single(shape) if shape is not None else None
    if shape is None or not all(isinstance(size, int) and size > 0 for size in shape):
        raise ValueError(f"a module matched by the normalization rule '{rule.key}' needs an attribute "
                         f"normalized_shape of positive ints (the trailing dimensions it normalizes), got {shape!r}")
    unset = [name for name in rule.hyper if getattr(module, name, 0.0) is None]
    if unset:
        raise ValueError(f"the module's {unset[0]} is None; set it to a number (e.g. nn.RMSNorm(..., eps=1e-6): "
                         "eps=None means the machine epsilon of the input's dtype, which hbpc does not follow)")
    hyper = {"normalized_shape": shape,
             **{name: float(getattr(module, name, default)) for name, default in rule.hyper.items()}}
    roles = _param_roles(module)
    if roles and tuple(sorted(roles)) not in rule.affine:
        raise ValueError(f"the module has parameters {sorted(roles)}, but the normalization rule '{rule.key}' names "
                         f"no affine rule for them (affine={{{tuple(sorted(roles))!r}: 'entry_scale' / ...}})")
    for role, p in roles.items():
        if tuple(p.shape) != shape:
            raise ValueError(f"parameter '{role}' has shape {tuple(p.shape)}; an affine map after '{rule.key}' "
                             f"needs the normalized_shape {shape}")
    return hyper, {role: param_names[id(p)] for role, p in roles.items()}, {r: tuple(p.shape) for r, p in roles.items()}


def _with_affine(ir_node, taken):
    """A normalization with a weight and/or bias as two IR nodes: the normalization, then its ``affine`` rule."""
    rule = ir_node.rule
    if not isinstance(rule, Normalization) or not ir_node.params:
        return [ir_node]
    affine = TABLE[rule.affine[tuple(sorted(ir_node.params))]]
    name, shape = _identifier(f"{ir_node.name}_affine", affine.key, taken), ir_node.y_shape
    return [replace(ir_node, params={}, param_shapes={}),
            replace(ir_node, name=name, op=affine.key, rule=affine, inputs=(ir_node.name,), x_shapes=(shape,),
                    hyper={"normalized_shape": ir_node.hyper["normalized_shape"]})]


def _ir_node(node, name, rule, hyper, inputs, x_shapes, y_shape, params=None, param_shapes=None, buffers=None):
    return ir.Node(name, rule.key, rule, hyper, tuple(inputs), tuple(x_shapes), y_shape, params or {},
                   param_shapes or {}, buffers or {}, _source(node), node.name)


def _chain_ir(node, source, x_shape, steps, taken, stem=None):
    """IR nodes for ``steps`` (``(rule key, hyper, y_shape[, params, param_shapes])``) applied to IR node ``source``."""
    chain = []
    for key, hyper, y_shape, *params in steps:
        rule = TABLE[key]
        name = _identifier(stem or (node.name if not chain else f"{node.name}_{key}"), rule.key, taken)
        chain.append(_ir_node(node, name, rule, hyper, [source], [x_shape], y_shape, *params))
        source, x_shape, stem = name, y_shape, None
    return chain


def _window_pool_ir(node, source, x_shape, axes, taken):
    """Average pooling with windows of different sizes, one axis after the other: each output position is the mean
    (sum / divisor) of a crop of its window, and ``cat`` joins them (a constant linear map, exact).
    ``axes``: {axis counted with the batch: [(start, stop, divisor), ...]}."""
    chain = []
    for axis, windows in axes.items():
        ends = [_chain_ir(node, source, x_shape, steps, taken, f"{node.name}_{axis}_{j}")
                for j, steps in enumerate(window_branches(x_shape, axis, windows))]
        chain += [n for branch in ends for n in branch]
        y_shape = tuple(len(windows) if a == axis - 1 else s for a, s in enumerate(x_shape))
        if len(ends) == 1:  # one window: no cat
            source, x_shape = ends[0][-1].name if ends[0] else source, y_shape
            continue
        name = _identifier(f"{node.name}_{axis}", "cat", taken)
        chain.append(_ir_node(node, name, TABLE["cat"], {"dim": axis}, [b[-1].name for b in ends],
                              [b[-1].y_shape for b in ends], y_shape))
        source, x_shape = name, y_shape
    return chain


def _uneven_pool_windows(node, op, rule, module, x_shape):
    """{axis: windows} of an average pooling whose windows differ in size or divisor, else None (``chains.py``)."""
    if op in ("adaptiveavgpool1d", "adaptive_avg_pool1d", "adaptiveavgpool2d", "adaptive_avg_pool2d"):
        out = _adaptive_output_size(node, op, module, x_shape)
        if all(x % o == 0 for x, o in zip(x_shape[-len(out):], out)):
            return None  # even windows: an average pooling
        first = len(x_shape) - len(out) + 1
        return {axis: adaptive_windows(x_shape[axis - 1], o) for axis, o in enumerate(out, start=first)
                if o != x_shape[axis - 1]}
    if rule is None or not rule.key.startswith("avg_pool"):
        return None
    if module is None:
        bound = {**_FUNCTIONAL_DEFAULTS[rule.key], **dict(zip(_FUNCTIONAL_ARGS[rule.key], node.args)), **node.kwargs}
        module = SimpleNamespace(**bound)
    override = getattr(module, "divisor_override", None)
    if not module.ceil_mode and module.count_include_pad and not override:
        return None
    size = {"1d": _single, "3d": _triple}.get(rule.key[-2:], _pair)
    kernel, padding = size(module.kernel_size), size(module.padding)
    stride = size(module.stride or module.kernel_size)
    first = len(x_shape) - len(kernel) + 1
    axes = {axis: avg_pool_windows(x_shape[axis - 1], k, s, p, module.ceil_mode, module.count_include_pad)
            for axis, k, s, p in zip(range(first, len(x_shape) + 1), kernel, stride, padding)}
    if override:  # sum over the window, divided by the override once
        axes = {axis: [(a, b, override if axis == len(x_shape) else 1) for a, b, _ in windows]
                for axis, windows in axes.items()}
    return axes


def _chained_nodes(node, op, tensor_args, modules, param_names, names, taken):
    """(source fx node, IR nodes) for an op lowered as several existing rules, else ``None`` (``chains.py``)."""
    module = modules.get(node.target) if node.op == "call_module" else None
    x_shape = tuple(tensor_args[0].meta["tensor_meta"].shape[1:]) if tensor_args else None
    windows = _uneven_pool_windows(node, op, TABLE.get(op), module, x_shape) if tensor_args else None
    rows = [a for a in node.args if isinstance(a, fx.Node) and "hbpc_rows" in a.meta]
    if windows is not None:
        source, steps = tensor_args[0], None
    elif op == "add" and rows and len(tensor_args) == 1:
        source = tensor_args[0]
        steps = positional_rows(x_shape, rows[0].meta["hbpc_rows"], rows[0].meta["hbpc_parameter"])
    elif op == "groupnorm" and module is not None:
        source, steps = tensor_args[0], group_norm_chain(module, x_shape, param_names)
    else:
        chain = shape_chain(node, op)
        if chain is None:
            return None
        (source, steps), x_shape = chain, tuple(chain[0].meta["tensor_meta"].shape[1:])
    if source not in names:
        return source, []  # its input failed to lower; that is reported
    if steps is None:
        return source, _window_pool_ir(node, names[source], x_shape, windows, taken)
    return source, _chain_ir(node, names[source], x_shape, steps, taken)


def _dag_ir(node, sources, steps, taken):
    """IR nodes for ``steps`` (``attention.py``: a small DAG) applied to ``sources`` ([(IR name, per-sample shape)])."""
    made, chain = [], []
    rules = [TABLE[key] if isinstance(key, str) else key for key, *_ in steps]
    shape_ops = ("transpose", "reshape", "crop")  # the op's own name goes to its first other step
    main = next((k for k, rule in enumerate(rules) if rule.key not in shape_ops), 0)
    for k, (rule, (_, hyper, inputs, y_shape, *params)) in enumerate(zip(rules, steps)):
        ins = [sources[int(i[1:])] if isinstance(i, str) else made[i] for i in inputs]
        if rule.key == "linear" and len(ins[0][1]) != 1:
            rule = TABLE["shared_linear"]  # projections of (N, *S, D): the weight is shared over the positions S
        name = _identifier(node.name if k == main else f"{node.name}_{rule.key}", rule.key, taken)
        chain.append(_ir_node(node, name, rule, hyper, [n for n, _ in ins], [s for _, s in ins], y_shape, *params))
        made.append((name, y_shape))
    return chain


def _lower_nodes(module, example_input, absorb_log_softmax=False):
    """IR nodes in topological order; ``inputs`` names the producing IR nodes (``"x"`` for the model input)."""
    modules = dict(module.named_modules())
    param_names = {id(p): name for name, p in module.named_parameters()}
    taken, problems, ir_nodes, names = {"x"}, [], [], {}  # "x" is the model input: no node takes its name
    masks = mask_constants(module.graph)  # folded into the masking steps that use them
    for node in module.graph.nodes:
        if node.op == "placeholder":
            names[node] = "x"
        if node.op in ("placeholder", "output", "get_attr") or node in masks:
            continue
        op = _op_name(node, modules)
        meta = node.meta.get("tensor_meta")
        if op in _SHAPE_ONLY and not isinstance(meta, TensorMetadata):
            continue  # sizes feed reshapes, whose target shape comes from shape propagation
        where = f"node `{node.name}` ({_describe(node, modules)}) at {_source(node)}"
        tensor_args = [a for a in node.all_input_nodes if _is_tensor(a)]
        if absorb_log_softmax and op in ("log_softmax", "logsoftmax") and node.users and all(
                u.op == "output" for u in node.users):
            names[node] = node.name
            ir_nodes.append(ir.Node(node.name, "log_softmax", None, {}, (names[tensor_args[0]],), (), (),
                                    fx_name=node.name))  # absorbed into the loss (_absorb_log_softmax)
            continue
        try:
            if _positional_embedding(node, op, module, modules) or _expanded_parameter(node, op, module):
                continue
        except ValueError as error:
            problems.append(f"{error}: {where}")
            continue
        if isinstance(meta, TensorMetadata) and meta.shape[:1] != example_input.shape[:1]:
            problems.append(f"its output has shape {tuple(meta.shape)}, which does not keep the batch "
                            f"({example_input.shape[0]}) as its first axis (hbpc compiles per-sample maps): {where}")
            continue
        if is_split(op, meta):
            continue  # each output is lowered where a getitem picks it
        try:
            attention = _parameter_cat(node, op, module) or attention_chain(node, op, module)
        except ValueError as error:
            problems.append(f"{error}: {where}")
            continue
        if attention is not None:
            sources, steps = attention
            if all(source in names for source in sources):  # else an input failed to lower; that is reported
                try:
                    shapes = [getattr(a.meta.get("tensor_meta"), "shape", (None,))[1:] for a in sources]
                    chain = _dag_ir(node, [(names[a], tuple(s)) for a, s in zip(sources, shapes)], steps, taken)
                except ValueError as error:
                    problems.append(f"{error}: {where}")
                    continue
                ir_nodes += chain
                names[node] = chain[-1].name if chain else names[sources[0]]
            continue
        try:
            chained = _chained_nodes(node, op, tensor_args, modules, param_names, names, taken)
        except ValueError as error:
            problems.append(f"{error}: {where}")
            continue
        if chained is not None:
            source, chain = chained
            if source in names:
                ir_nodes += chain
                names[node] = chain[-1].name if chain else names[source]
            continue
        try:
            rule, hyper, params, param_shapes = _lower_node(node, op, TABLE.get(op), tensor_args, modules, module,
                                                            param_names)
        except KeyError:
            problems.append(f"unsupported op '{op}': {where}")
            continue
        except ValueError as error:
            problems.append(f"{error}: {where}")
            continue
        if any(a not in names for a in tensor_args):
            continue  # an input already failed to lower; it is reported
        name = _identifier(node.name, rule.key, taken)
        buffers = hyper.pop("buffers", {})
        ir_nodes += _with_affine(_ir_node(node, name, rule, hyper, [names[a] for a in tensor_args],
                                          [tuple(a.meta["tensor_meta"].shape[1:]) for a in tensor_args],
                                          tuple(meta.shape[1:]), params, param_shapes, buffers), taken)
        names[node] = ir_nodes[-1].name
    output = next(n for n in module.graph.nodes if n.op == "output").args[0]
    if not isinstance(output, fx.Node):
        raise HbpcError(f"the model must return a single tensor, not a {type(output).__name__}",
                        f"{type(module).__name__}.forward",
                        "return one tensor (the logits) from forward")
    if not problems and output not in names:
        problems.append("the model must return a single tensor computed by supported ops")
    elif not problems and not absorb_log_softmax:
        _check_single_output(ir_nodes, names[output])
    return ir_nodes, problems


def _check_single_output(ir_nodes, output):
    if not ir_nodes:
        raise HbpcError("the model has no ops", "the model's forward", "compile a model with at least one layer")
    used = {i for n in ir_nodes for i in n.inputs}
    dangling = [n.name for n in ir_nodes if n.name not in used and n.name != output]
    if dangling or ir_nodes[-1].name != output:
        raise HbpcError(f"nodes {dangling} compute values that do not reach the output", "the model's forward",
                        "remove unused computations")


_NLL_AFTER_LOG_SOFTMAX = "nllloss"
_TOKEN_LOSSES = {"crossentropyloss": 1, "tokencrossentropyloss": -1}  # loss_fn class -> the logits' class axis


def _token_loss(loss_fn, loss, key, out_shape):
    """``{"class_axis", "ignore_index"}`` for cross-entropy on logits with positions ((N, C, *S), or (N, *S, C) for
    ``hbpc.losses.TokenCrossEntropyLoss``), labels (N, *S); None for logits (N, C)."""
    axis = _TOKEN_LOSSES.get(type(loss_fn).__name__.lower()) if loss is None and loss_fn is not None else None
    if axis is None and loss is not None and key == "cross_entropy":
        axis = 1
    if axis is None or len(out_shape) < 2:
        return None
    return {"class_axis": axis, "ignore_index": int(getattr(loss_fn, "ignore_index", -100))}


def _loss_key(loss_fn, loss):
    """(rule, reduction, hyper) of the loss; ``--loss`` (``key`` or ``key:reduction``) overrides ``loss_fn``."""
    if loss is not None:
        key, _, reduction = loss.partition(":")
        reduction, options = reduction or "mean", {}
    else:
        loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        key, reduction = type(loss_fn).__name__.lower(), getattr(loss_fn, "reduction", "mean")
        options = {name: getattr(loss_fn, name) for name in ("weight", "pos_weight", "ignore_index")
                   if getattr(loss_fn, name, None) is not None}
        if options.get("ignore_index", -100) == -100 or key in _TOKEN_LOSSES:
            options.pop("ignore_index", None)  # cross-entropy over tokens: labels equal to it are left out
        if options:
            raise HbpcError(f"{type(loss_fn).__name__} with {', '.join(options)} is not supported", "loss_fn",
                            f"use {type(loss_fn).__name__}() without {', '.join(options)}")
    rule = LOSS_TABLE.get("cross_entropy" if key in (_NLL_AFTER_LOG_SOFTMAX, *_TOKEN_LOSSES) else key)
    if rule is None:
        supported = ", ".join(sorted({r.key for r in LOSS_TABLE.values()} | {"nll_loss after log_softmax"}))
        raise HbpcError(f"unsupported loss '{key}'", "loss_fn / --loss", f"use one of: {supported}")
    if reduction not in rule.scale:
        raise HbpcError(f"unsupported reduction '{reduction}' for loss '{rule.key}'", "loss_fn / --loss",
                        f"use one of: {', '.join(rule.scale)}")
    hyper = {name: float(getattr(loss_fn, name, default)) if loss is None else default
             for name, default in rule.hyper.items()}
    return rule, reduction, hyper, key == _NLL_AFTER_LOG_SOFTMAX


def _absorb_log_softmax(ir_nodes, module):
    """NLLLoss after a final log_softmax over classes is cross-entropy of the log_softmax's input."""
    output = next(n for n in module.graph.nodes if n.op == "output").args[0]
    name = getattr(output, "name", None)
    last = ir_nodes[-1] if ir_nodes else None
    if last is None or last.fx_name != name or last.op != "log_softmax":
        raise HbpcError("NLLLoss is supported only after a final log_softmax over classes", "loss_fn",
                        "end the model with nn.LogSoftmax(dim=1) / F.log_softmax(x, dim=1), or use CrossEntropyLoss")
    return ir_nodes[:-1]


def export(model: nn.Module, example_input: torch.Tensor, loss_fn=None, loss: str = None) -> nx.DiGraph:
    """Trace ``model`` and lower it to the IR; all problems are reported in one error."""
    if example_input.dim() < 2:
        raise HbpcError(f"example_input has shape {tuple(example_input.shape)}, but the first dimension must be "
                        "the batch", "example_input", "add a batch dimension, e.g. x.unsqueeze(0)")
    loss_rule, reduction, loss_hyper, after_log_softmax = _loss_key(loss_fn, loss)
    module = _trace(model, example_input)
    ir_nodes, problems = _lower_nodes(module, example_input, absorb_log_softmax=after_log_softmax)
    if problems:
        fix = _problems_fix(problems)
        what = "ops hbpc cannot compile" if fix else "ops in a form hbpc cannot compile"
        raise HbpcError(f"the model uses {what}:\n    " + "\n    ".join(problems), fix=fix)
    if after_log_softmax:
        ir_nodes = _absorb_log_softmax(ir_nodes, module)
    if not ir_nodes:
        raise HbpcError("the model has no ops", type(model).__name__, "compile a model with at least one layer")
    architecture = {name: tuple(p.shape) for name, p in model.named_parameters()}
    graph = nx.DiGraph(input_shape=tuple(example_input.shape[1:]), loss=loss_rule.key, loss_rule=loss_rule,
                       architecture=architecture,
                       reduction=reduction, loss_hyper=loss_hyper, order=[n.name for n in ir_nodes], model=type(model).__name__)
    for ir_node in ir_nodes:
        ir.add(graph, ir_node)
    out_shape = ir_nodes[-1].y_shape
    graph.graph["tokens"] = _token_loss(loss_fn, loss, loss_rule.key, out_shape) if not after_log_softmax else None
    if graph.graph["tokens"] is None and getattr(loss_fn, "ignore_index", -100) != -100 and loss is None:
        raise HbpcError(f"{type(loss_fn).__name__} with ignore_index is not supported for logits (N, C), only for "
                        f"logits with positions (N, C, *S); the model returns (N, {out_shape})", "loss_fn",
                        f"use {type(loss_fn).__name__}() without ignore_index")
    if loss_rule.target == "class" and len(out_shape) != 1 and graph.graph["tokens"] is None:
        raise HbpcError(f"{loss_rule.key} needs logits of shape (N, C), the model returns (N, {out_shape})",
                        ir_nodes[-1].source, "flatten the output or use MSELoss")
    return graph


def graph_hash(graph: nx.DiGraph) -> str:
    """A short digest of everything the generated code depends on."""
    payload = {
        "input": graph.graph["input_shape"], "loss": graph.graph["loss"], "reduction": graph.graph["reduction"],
        "loss_hyper": graph.graph["loss_hyper"], **({"tokens": graph.graph["tokens"]} if graph.graph.get("tokens") else {}),
        "nodes": [[n.op, n.hyper, n.inputs, n.x_shapes, n.y_shape, n.params] for n in ir.nodes(graph)],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:16]
