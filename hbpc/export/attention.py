"""Attention ops lowered onto existing rules: softmax over any axis, constant masks, scaled dot-product attention.

==========================================================  =====================================================
``F.softmax(x, dim)``, ``F.log_softmax``, ``nn.Softmax``      ``softmax`` / ``log_softmax`` over the last axis (a
                                                            ``Normalization``), between two ``transpose`` steps
                                                            for another axis
``x.masked_fill(mask, value)`` for a constant mask            ``masked_fill``: a constant selection with an offset
``x + mask`` for a constant mask of 0 and -inf                 the same ``masked_fill`` (value -inf)
``F.scaled_dot_product_attention(q, k, v)``                   ``transpose`` k, ``matmul``, ``scale``, the mask,
(``is_causal``, a constant ``attn_mask``, ``dropout_p=0``)    ``softmax``, ``matmul``
``nn.MultiheadAttention`` (self-attention, batch first)       in-projection ``linear``, ``crop`` to q, k, v, heads
                                                            (``reshape``, ``transpose``), the attention above,
                                                            heads back, out-projection ``linear``
==========================================================  =====================================================

A constant is a tensor that depends on neither the input nor a parameter (``trace.CONSTANT``: a buffer, a slice of
it, a comparison): it is the same for every sample, so the masked entries of one sample are fixed at compile time.

Steps form a small DAG: ``(rule key, hyper, inputs, y_shape[, params, param_shapes])``, each input an ``int`` (an
earlier step) or ``"s<k>"`` (the op's ``k``-th tensor argument). Shapes are per sample; axes in ``hyper`` count the
batch.
"""
import math

import torch
import torch.fx as fx

from .trace import CONSTANT

SOFTMAX_OPS = {"softmax": "softmax", "log_softmax": "log_softmax", "logsoftmax": "log_softmax"}
_MASK_USERS = {"masked_fill", "masked_fill_", "add", "scaled_dot_product_attention"}


def _arg(node, position, name, default=None):
    return node.kwargs.get(name, node.args[position] if len(node.args) > position else default)


def _shape(node):
    return tuple(node.meta["tensor_meta"].shape[1:])


def is_constant(arg) -> bool:
    return isinstance(arg, fx.Node) and CONSTANT in arg.meta


def mask_constants(graph) -> set:
    """Constant nodes used only as masks (by masked_fill, a mask addition or attention) or by such constants: they
    are folded into the masking step, not lowered."""
    found = set()
    for node in reversed(graph.nodes):
        if is_constant(node) and node.users and all(user in found or _takes_mask(user, node) for user in node.users):
            found.add(node)
    return found


def _takes_mask(user, node) -> bool:
    """Whether ``user`` may read ``node`` as a mask: a masking op, or a module's mask argument (after q, k, v)."""
    if user.op == "call_module":
        return node in user.args[3:] or node in user.kwargs.values()
    return _name(user) in _MASK_USERS


def _name(node) -> str:
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def softmax_steps(key, x_shape, dim):
    """``key`` over axis ``dim`` (counted with the batch): the last axis directly, another between transposes."""
    rank = len(x_shape) + 1
    if dim is None:
        raise ValueError(f"{key} needs an explicit dim (the implicit choice is deprecated in torch)")
    axis = dim + rank if dim < 0 else dim
    if not 0 < axis < rank:
        raise ValueError(f"{key} over the batch axis couples the samples; take it over a per-sample axis")
    last = rank - 1
    moved = list(x_shape)
    moved[axis - 1], moved[last - 1] = moved[last - 1], moved[axis - 1]
    moved = tuple(moved)
    hyper = {"normalized_shape": (moved[-1],), "entries": moved[-1]}
    if axis == last:
        return [(key, hyper, ["s0"], x_shape)]
    swap = {"dims": (axis, last)}
    return [("transpose", swap, ["s0"], moved), (key, hyper, [0], moved), ("transpose", swap, [1], x_shape)]


def masked_entries(mask, x_shape) -> object:
    """The masked entries of a constant boolean ``mask`` broadcast to a sample (per-sample ``x_shape``): "causal"
    (entry (i, j) of the last two axes where j > i, every leading index) or a tuple of flat indices."""
    mask = torch.as_tensor(mask, dtype=torch.bool)
    try:
        full = torch.broadcast_to(mask, (max(1, mask.shape[0] if mask.dim() > len(x_shape) else 1), *x_shape))
    except RuntimeError:
        raise ValueError(f"a mask of shape {tuple(mask.shape)} does not broadcast to the per-sample shape "
                         f"{x_shape} (with the batch first)") from None
    if not bool((full == full[:1]).all()):
        raise ValueError("the mask differs between samples; only a mask that is the same for every sample (a causal "
                         "or fixed padding mask) is supported")
    sample = full[0]
    if len(x_shape) >= 2:
        causal = torch.ones(x_shape[-2:], dtype=torch.bool).triu(1).expand(x_shape)
        if bool((sample == causal).all()):
            return "causal"
    return tuple(int(i) for i in sample.flatten().nonzero().flatten())


def _fill(value) -> str:
    """The fill value as text for ``float(...)`` in generated code ('-inf' stays readable)."""
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    return repr(value) if math.isfinite(value) else str(value)


def masked_fill_steps(x_shape, mask, value):
    return [("masked_fill", {"masked": masked_entries(mask, x_shape), "value": _fill(value)}, ["s0"], x_shape)]


def _additive_mask(constant):
    """A constant added to scores: a mask of 0 and -inf, as the boolean mask of its -inf entries."""
    values = constant.detach()
    if not bool(((values == 0) | (values == float("-inf"))).all()):
        raise ValueError("adding a constant tensor is supported only for a mask of 0 and -inf entries")
    return values == float("-inf")


def attention_steps(q_shape, k_shape, v_shape, scale, masked, refs=("s0", "s1", "s2")):
    """softmax(q kᵀ · scale, masked entries -inf) v for per-sample q (..., L, E), k (..., S, E), v (..., S, Ev)."""
    if q_shape[:-2] != k_shape[:-2] or k_shape[:-1] != v_shape[:-1] or q_shape[-1] != k_shape[-1]:
        raise ValueError(f"attention needs q (..., L, E), k (..., S, E), v (..., S, Ev) with equal leading sizes, "
                         f"got {q_shape}, {k_shape}, {v_shape} (no broadcasting or grouped heads)")
    rank = len(q_shape) + 1
    q, k, v = refs
    scores = (*q_shape[:-1], k_shape[-2])
    steps = [("transpose", {"dims": (rank - 2, rank - 1)}, [k], (*k_shape[:-2], k_shape[-1], k_shape[-2])),
             ("matmul", {}, [q, 0], scores),
             ("scale", {"scale": float(scale)}, [1], scores)]
    if masked is not None:
        steps.append(("masked_fill", {"masked": masked, "value": "-inf"}, [len(steps) - 1], scores))
    steps += shifted(softmax_steps("softmax", scores, -1), len(steps), {"s0": len(steps) - 1})
    steps.append(("matmul", {}, [len(steps) - 1, v], (*q_shape[:-1], v_shape[-1])))
    return steps


def _attention_mask(mask_node, is_causal, scores):
    """The masked entries of SDPA's scores from ``is_causal`` or a constant ``attn_mask`` (True or 0: attend)."""
    if mask_node is not None and is_causal:
        raise ValueError("scaled_dot_product_attention takes attn_mask or is_causal, not both")
    if is_causal:
        return masked_entries(torch.ones(scores[-2:], dtype=torch.bool).triu(1), scores)
    if mask_node is None:
        return None
    if not is_constant(mask_node):
        raise ValueError("attn_mask must be a constant (a buffer or a tensor computed from buffers), the same for "
                         "every call")
    mask = mask_node.meta[CONSTANT]
    return masked_entries(~mask if mask.dtype == torch.bool else _additive_mask(mask), scores)


def _sdpa(node):
    if _arg(node, 4, "dropout_p", 0.0) != 0.0:
        raise ValueError("scaled_dot_product_attention with dropout_p > 0 is random, so it has no curvature; pass "
                         "dropout_p=0.0 (e.g. dropout_p=self.dropout if self.training else 0.0 with model.eval())")
    if _arg(node, 7, "enable_gqa", False):
        raise ValueError("scaled_dot_product_attention with enable_gqa=True is not supported")
    q, k, v = (_arg(node, p, name) for p, name in enumerate(("query", "key", "value")))
    q_shape, k_shape, v_shape = _shape(q), _shape(k), _shape(v)
    scale = _arg(node, 6, "scale")
    scale = 1 / math.sqrt(q_shape[-1]) if scale is None else scale
    scores = (*q_shape[:-1], k_shape[-2])
    masked = _attention_mask(_arg(node, 3, "attn_mask"), _arg(node, 5, "is_causal", False), scores)
    return [q, k, v], attention_steps(q_shape, k_shape, v_shape, scale, masked)


def shifted(steps, offset, external):
    """``steps`` placed after ``offset`` others: internal inputs move by ``offset``, labels map through ``external``."""
    return [(key, hyper, [external[i] if isinstance(i, str) else i + offset for i in inputs], *rest)
            for key, hyper, inputs, *rest in steps]


def _multihead_mask(mask_node, scores):
    """The masked entries of nn.MultiheadAttention's scores from a constant (T, T) attn_mask (True or -inf: masked);
    its is_causal is only a hint about attn_mask."""
    if mask_node is None:
        return None
    if not is_constant(mask_node) or mask_node.meta[CONSTANT].dim() != 2:
        raise ValueError("nn.MultiheadAttention needs attn_mask as a constant (T, T) tensor (a buffer or computed from "
                         "buffers), the same for every sample and head")
    mask = mask_node.meta[CONSTANT]
    return masked_entries(mask if mask.dtype == torch.bool else _additive_mask(mask), scores)


def _multihead(node, module, param_names):
    """nn.MultiheadAttention as self-attention, batch first: one packed in-projection, heads, attention, out-projection."""
    query, key, value = (_arg(node, p, name) for p, name in enumerate(("query", "key", "value")))
    if not module.batch_first:
        raise ValueError("nn.MultiheadAttention with batch_first=False takes (T, N, D) inputs: hbpc compiles per-sample "
                         "maps with the batch first; construct it with batch_first=True")
    if not (query is key is value):
        raise ValueError("nn.MultiheadAttention is supported as self-attention only (query, key and value the same "
                         "tensor): cross-attention would slice the packed in-projection weight")
    if _arg(node, 3, "key_padding_mask") is not None:
        raise ValueError("nn.MultiheadAttention with key_padding_mask is not supported (a constant attn_mask of shape "
                         "(T, T) is)")
    if module.in_proj_weight is None or module.bias_k is not None or module.add_zero_attn or module.dropout > 0:
        raise ValueError("nn.MultiheadAttention needs one packed in-projection (kdim = vdim = embed_dim), no "
                         "add_bias_kv or add_zero_attn, and dropout=0")
    x_shape = _shape(query)
    if len(x_shape) != 2:
        raise ValueError(f"nn.MultiheadAttention needs inputs (N, T, D), got per-sample shape {x_shape}")
    (length, width), heads = x_shape, module.num_heads
    head = width // heads
    params = {"weight": param_names[id(module.in_proj_weight)]}
    if module.in_proj_bias is not None:
        params["bias"] = param_names[id(module.in_proj_bias)]
    shapes = {role: tuple(getattr(module, f"in_proj_{role}").shape) for role in params}
    steps = [("linear", {}, ["s0"], (length, 3 * width), params, shapes)]
    for part in range(3):  # q, k, v: crop the packed projection, then (T, D) -> (T, H, d) -> (H, T, d)
        steps += [("crop", {"padding": (-part * width, (part - 2) * width)}, [0], (length, width)),
                  ("reshape", {}, [len(steps)], (length, heads, head)),
                  ("transpose", {"dims": (1, 2)}, [len(steps) + 1], (heads, length, head))]
    masked = _multihead_mask(_arg(node, 5, "attn_mask"), (heads, length, length))
    core = attention_steps((heads, length, head), (heads, length, head), (heads, length, head), 1 / math.sqrt(head),
                           masked, refs=("q", "k", "v"))
    steps += shifted(core, len(steps), {"q": 3, "k": 6, "v": 9})
    out = {"weight": param_names[id(module.out_proj.weight)]}
    if module.out_proj.bias is not None:
        out["bias"] = param_names[id(module.out_proj.bias)]
    out_shapes = {role: tuple(getattr(module.out_proj, role).shape) for role in out}
    steps += [("transpose", {"dims": (1, 2)}, [len(steps) - 1], (length, heads, head)),
              ("reshape", {}, [len(steps)], (length, width)),
              ("linear", {}, [len(steps) + 1], (length, width), out, out_shapes)]
    return [query], steps


def _bilinear(node, op, a, b):
    """``a @ b`` / ``torch.bmm`` / ``torch.einsum(equation, a, b)`` of two activations: one ``Bilinear`` step."""
    from hbpc.rules import TABLE
    from hbpc.rules.bilinear import einsum_rule

    y_shape = tuple(node.meta["tensor_meta"].shape[1:])
    if op == "einsum":
        return [(einsum_rule(node.args[0]), {"equation": node.args[0].replace(" ", "")}, ["s0", "s1"], y_shape)]
    a_shape, b_shape = _shape(a), _shape(b)
    if len(a_shape) < 2 or len(b_shape) < 2 or a_shape[:-2] != b_shape[:-2]:
        raise ValueError(f"matmul of per-sample shapes {a_shape} and {b_shape}: both need two matrix axes and equal "
                         "leading sizes (no broadcasting)")
    return [(TABLE["matmul"], {}, ["s0", "s1"], y_shape)]


def _operands(node, op):
    """The two tensor operands of a product (constants and parameters are not activations), else ValueError."""
    args = node.args[1:] if op == "einsum" else node.args[:2]
    if op == "einsum" and len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = tuple(args[0])
    tensors = [a for a in args if isinstance(a, fx.Node) and a.op != "get_attr" and not is_constant(a)]
    if len(args) != 2 or len(tensors) != 2:
        raise ValueError(f"'{op}' is supported as a product of two activations (tensors computed from the input); "
                         "a parameter operand is a Linear layer (nn.Linear / F.linear)")
    return tensors


def attention_chain(node, op, module):
    """(source fx nodes, steps) of an attention op, ``None`` if ``op`` is not one; ValueError for forms it refuses."""
    if node.op == "call_module":
        target = module.get_submodule(node.target)
        if op == "multiheadattention":
            param_names = {id(p): name for name, p in module.named_parameters()}
            return _multihead(node, target, param_names)
        if op in SOFTMAX_OPS:
            return [node.args[0]], softmax_steps(SOFTMAX_OPS[op], _shape(node.args[0]), target.dim)
        return None
    if op in ("matmul", "bmm", "einsum"):
        a, b = _operands(node, op)
        return [a, b], _bilinear(node, op, a, b)
    if op in SOFTMAX_OPS:
        if _arg(node, 3 if node.op == "call_function" else 2, "dtype") is not None:
            raise ValueError(f"{op} with a dtype is not supported")
        x = _arg(node, 0, "input")
        return [x], softmax_steps(SOFTMAX_OPS[op], _shape(x), _arg(node, 1, "dim"))
    if op in ("masked_fill", "masked_fill_"):
        x, mask, value = node.args[0], _arg(node, 1, "mask"), _arg(node, 2, "value")
        if not is_constant(mask):
            raise ValueError("masked_fill needs a constant mask (a buffer or a tensor computed from buffers), the same "
                             "for every call")
        if isinstance(value, fx.Node):
            if not is_constant(value):
                raise ValueError("masked_fill needs a constant fill value")
            value = value.meta[CONSTANT]
        return [x], masked_fill_steps(_shape(x), mask.meta[CONSTANT], value)
    if op == "add" and len(node.args) == 2 and sum(map(is_constant, node.args)) == 1:
        x, constant = sorted(node.args, key=is_constant)
        if isinstance(x, fx.Node) and x.op != "get_attr":
            return [x], masked_fill_steps(_shape(x), _additive_mask(constant.meta[CONSTANT]), "-inf")
    if op == "scaled_dot_product_attention":
        return _sdpa(node)
    if op == "getitem" and node.args[0].op == "call_module" and _name_of_module(node.args[0], module) == "multiheadattention":
        if node.args[1] != 0:
            raise ValueError("the attention weights of nn.MultiheadAttention are not supported: use its output [0] "
                             "(need_weights=False)")
        return [node.args[0]], []
    return None


def _name_of_module(node, module) -> str:
    return type(module.get_submodule(node.target)).__name__.lower()
