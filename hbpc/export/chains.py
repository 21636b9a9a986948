"""Ops lowered as chains of existing rules. Shape ops are linear selections of the input's entries:

=====================================================  ==========================================================
``x.transpose(a, b)``, ``x.permute(...)``              ``transpose`` (one per swap)
``x[:, 0]``, ``x[:, 0, ::2, 0:2]``, ``x.narrow``         ``crop`` (negative padding), and for steps a ``reshape``
                                                       ``(L, ) -> (L / step, step)`` and a ``crop`` to the first
``x.split``, ``x.chunk``, ``x.unbind`` (each output)   ``crop`` of the input along the axis
``x.sum(dim)``, ``x.mean(dim)``                        ``sum`` / ``mean`` (one per axis, keeping it), ``reshape``
average pooling with uneven windows (adaptive, ``ceil_mode``, ``count_include_pad=False``, ``divisor_override``):
                                                       per axis, per window ``crop`` and ``mean``, then ``cat``
=====================================================  ==========================================================

``nn.GroupNorm`` is ``reshape (G, C/G·S) -> layer_norm -> reshape -> channel_affine``, and adding (multiplying by) a
learned parameter broadcast over leading axes (``x + self.pos``) is ``entry_shift`` (``entry_scale``); adding its
first T rows (``x + self.wpe(torch.arange(T))``) is ``crop`` (zero rows padded), ``entry_shift``, ``crop``.

A chain is a list of steps ``(rule key, hyper, y_shape)`` from a source fx node; each step's input is the previous
step's output. Shapes are per sample (no batch dimension); axes in ``hyper`` count the batch (as torch does).
"""
from math import ceil, floor, prod

import torch.fx as fx
from torch.fx.passes.shape_prop import TensorMetadata

_SPLITS = frozenset({"split", "chunk", "unbind", "tensor_split", "split_with_sizes"})
_PERMUTES = frozenset({"permute"})
_TRANSPOSES = frozenset({"transpose", "swapaxes"})
_REDUCTIONS = frozenset({"sum", "mean"})
SHAPE_CHAINS = _SPLITS | _PERMUTES | _TRANSPOSES | _REDUCTIONS | {"getitem", "narrow"}


def is_split(op, meta) -> bool:
    """A multi-output split, resolved at the ``getitem`` that picks each output."""
    return op in _SPLITS and _is_multi_output(meta)


def _is_multi_output(meta) -> bool:
    return isinstance(meta, (tuple, list)) and not isinstance(meta, TensorMetadata)


def _name(node) -> str:
    """The op name of a call: ``x.split`` and ``torch.split`` are both ``split``."""
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def _shape(node):
    return tuple(node.meta["tensor_meta"].shape)


def _axis(dim, rank) -> int:
    """A per-sample axis counted with the batch (1 .. rank - 1); the batch axis itself is refused."""
    axis = dim + rank if dim < 0 else dim
    if not 0 < axis < rank:
        raise ValueError(f"'{dim}' is the batch axis (or out of range): shape ops act on per-sample axes only")
    return axis


def _arg(node, position, name, default=None):
    return node.kwargs.get(name, node.args[position] if len(node.args) > position else default)


def _crop(shape, windows):
    """A ``crop`` step selecting ``[start, stop)`` along each axis of ``windows`` ({axis counted with batch: (start,
    stop)}; ``stop`` may pass the end: zeros are padded) of the per-sample ``shape``."""
    out, padding = list(shape), []
    first = min(windows) - 1
    for p in reversed(range(first, len(shape))):
        start, stop = windows.get(p + 1, (0, shape[p]))
        padding += [-start, stop - shape[p]]
        out[p] = stop - start
    return ("crop", {"padding": tuple(padding)}, tuple(out))


def _reshape(shape):
    return ("reshape", {}, tuple(shape))


def _transposes(permutation):
    """Swaps that turn the identity into ``permutation`` (axes counted with the batch)."""
    current, swaps = list(range(len(permutation))), []
    for position, wanted in enumerate(permutation):
        at = current.index(wanted)
        if at != position:
            current[position], current[at] = current[at], current[position]
            swaps.append((position, at))
    return swaps


def _permute_chain(x_shape, permutation):
    steps, shape = [], list(x_shape)
    for a, b in _transposes(permutation):
        shape[a - 1], shape[b - 1] = shape[b - 1], shape[a - 1]
        steps.append(("transpose", {"dims": (a, b)}, tuple(shape)))
    return steps


def _index_chain(x_shape, y_shape, index):
    """``x[index]`` with ints, slices (steps > 0), ``None`` and ``...``: crop, then for steps reshape and crop."""
    items = index if isinstance(index, tuple) else (index,)
    if any(not isinstance(item, (int, slice, type(None), type(Ellipsis))) or isinstance(item, bool) for item in items):
        raise ValueError("indexing with tensors, lists or booleans is not supported (only ints, slices, None, ...)")
    rank = len(x_shape) + 1
    consumed = sum(1 for item in items if item is not None and item is not Ellipsis)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + (slice(None),) * (rank - consumed) + items[at + 1:]
    items = [item for item in items if item is not None]
    items += [slice(None)] * (rank - len(items))
    if items[0] != slice(None):
        raise ValueError("indexing the batch axis is not supported: keep it whole (x[:, ...])")
    windows, steps = {}, {}
    for axis, item in enumerate(items[1:], start=1):
        size = x_shape[axis - 1]
        if isinstance(item, int):
            start = item + size if item < 0 else item
            windows[axis] = (start, start + 1)
            continue
        start, stop, step = item.indices(size)
        count = len(range(start, stop, step))
        if count == 0:
            raise ValueError("an empty slice selects nothing")
        windows[axis] = (start, start + step * count)
        if step > 1:
            steps[axis] = (count, step)
    chain = [_crop(x_shape, windows)] if any(w != (0, x_shape[a - 1]) for a, w in windows.items()) else []
    if steps:
        cropped = list(chain[-1][2] if chain else x_shape)
        split = []
        for axis, size in enumerate(cropped, start=1):
            split += list(steps[axis]) if axis in steps else [size]
        chain.append(_reshape(split))
        positions = {axis + sum(1 for a in steps if a < axis) + 1: (0, 1) for axis in steps}
        chain.append(_crop(tuple(split), positions))
    if (chain[-1][2] if chain else x_shape) != y_shape:
        chain.append(_reshape(y_shape))
    return chain


def _split_chain(split, position, x_shape):
    """Output ``position`` of a split/chunk/unbind of an input of per-sample shape ``x_shape``: a crop."""
    op = _name(split)
    rank = len(x_shape) + 1
    dim = _arg(split, 1 if op == "unbind" else 2, "dim", 0)
    axis = _axis(dim, rank)
    sizes = [tuple(meta.shape)[axis] if op != "unbind" else 1 for meta in split.meta["tensor_meta"]]
    start = sum(sizes[:position])
    chain = [_crop(x_shape, {axis: (start, start + sizes[position])})]
    piece = tuple(split.meta["tensor_meta"][position].shape[1:])
    return chain if chain[-1][2] == piece else chain + [_reshape(piece)]


def _reduction_chain(node, op, x_shape, y_shape):
    dims = _arg(node, 1, "dim")  # not None: a sum over all axes has no batch axis, which lower.py refuses
    rank = len(x_shape) + 1
    axes = sorted({_axis(d, rank) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}, reverse=True)
    chain, shape = [], list(x_shape)
    for axis in axes:
        hyper = {"dim": axis, "divisor": shape[axis - 1]} if op == "mean" else {"dim": axis}
        shape[axis - 1] = 1
        chain.append((op, hyper, tuple(shape)))
    return chain if tuple(shape) == y_shape else chain + [_reshape(y_shape)]


def shape_chain(node, op):
    """(source fx node, steps) for a shape op; ``None`` if ``op`` is not one. Raises ValueError for forms it refuses."""
    if op not in SHAPE_CHAINS or node.op not in ("call_function", "call_method"):
        return None
    source = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(source, fx.Node) or source.op == "get_attr":
        return None  # a parameter or constant sliced: not a map of the input (reported as unsupported)
    y_shape = tuple(node.meta["tensor_meta"].shape[1:])
    if op == "getitem" and _is_multi_output(source.meta.get("tensor_meta")):
        if _name(source) not in _SPLITS:
            return None  # an output of another multi-output op (an LSTM's): not a selection
        split, position = source, node.args[1]
        return split.args[0], _split_chain(split, position, _shape(split.args[0])[1:])
    x_shape = _shape(source)[1:]
    rank = len(x_shape) + 1
    if op == "getitem":
        return source, _index_chain(x_shape, y_shape, node.args[1])
    if op == "narrow":
        axis, start = _axis(_arg(node, 1, "dim"), rank), _arg(node, 2, "start")
        start = start + x_shape[axis - 1] if start < 0 else start
        return source, [_crop(x_shape, {axis: (start, start + _arg(node, 3, "length"))})]
    if op in _TRANSPOSES:
        a, b = _axis(_arg(node, 1, "dim0"), rank), _axis(_arg(node, 2, "dim1"), rank)
        return source, [] if a == b else [("transpose", {"dims": (min(a, b), max(a, b))}, y_shape)]
    if op in _PERMUTES:
        dims = node.args[1:] if node.op == "call_method" else (_arg(node, 1, "dims"),)
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else tuple(dims)
        permutation = tuple(d + rank if d < 0 else d for d in dims)
        if permutation[0] != 0:
            raise ValueError("permute must keep the batch axis first")
        return source, _permute_chain(x_shape, permutation)
    return source, _reduction_chain(node, op, x_shape, y_shape)


def adaptive_windows(size, out):
    """torch's adaptive average pooling windows along one axis: ``(start, stop, divisor)``,
    ``[floor(j·size/out), ceil((j+1)·size/out))`` averaged."""
    windows = [(floor(j * size / out), ceil((j + 1) * size / out)) for j in range(out)]
    return [(start, stop, stop - start) for start, stop in windows]


def avg_pool_windows(size, kernel, stride, padding, ceil_mode, count_include_pad):
    """torch's average pooling windows along one axis: ``(start, stop, divisor)`` of the entries summed.

    Windows start at ``j·stride − padding``; with ``ceil_mode`` a last partial window is kept if it starts inside
    the input or its left padding. The divisor counts the padding (up to ``size + padding``) if
    ``count_include_pad``, else only the input entries.
    """
    out = (ceil if ceil_mode else floor)((size + 2 * padding - kernel) / stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    windows = []
    for j in range(out):
        start = j * stride - padding
        stop = min(start + kernel, size + padding)
        padded = stop - start
        start, stop = max(start, 0), min(stop, size)
        windows.append((start, stop, padded if count_include_pad else stop - start))
    return windows


def window_branches(x_shape, axis, windows):
    """Per window along ``axis`` (counted with the batch): the chain ``crop -> mean`` (sum / divisor, axis kept)."""
    branches = []
    for start, stop, divisor in windows:
        crop = _crop(x_shape, {axis: (start, stop)})
        shape = list(crop[2])
        shape[axis - 1] = 1
        steps = [crop] if crop[2] != tuple(x_shape) else []
        if (stop - start, divisor) != (1, 1):  # else the crop is the window's sum and mean
            steps.append(("mean", {"dim": axis, "divisor": divisor}, tuple(shape)))
        branches.append(steps)
    return branches


def group_norm_chain(module, x_shape, param_names):
    """``nn.GroupNorm``: per sample, the channels in ``num_groups`` groups, each group normalized like a layer norm
    over its channels and locations, then a per-channel affine map. Steps carry ``(params, param_shapes)`` last."""
    groups, channels = module.num_groups, x_shape[0]
    entries = channels // groups * prod(x_shape[1:])
    chain = [_reshape((groups, entries)),
             ("layer_norm", {"normalized_shape": (entries,), "eps": float(module.eps)}, (groups, entries)),
             _reshape(x_shape)]
    if module.affine:
        params = {role: param_names[id(getattr(module, role))] for role in ("weight", "bias")}
        broadcast = (channels,) + (1,) * (len(x_shape) - 1)
        chain.append(("channel_affine", {"broadcast": broadcast}, x_shape, params,
                      {role: (channels,) for role in params}))
    return chain


def positional_rows(x_shape, p_shape, name):
    """``x + W[:T]`` for ``x`` (T, *D) and a parameter ``W`` (V, *D), V > T (``x + self.wpe(torch.arange(T))``): ``x``
    padded with zero rows to (V, *D), ``entry_shift`` by ``W``, cropped back to (T, *D). Exact; the rows past T get
    no gradient and no curvature."""
    if tuple(x_shape[1:]) != tuple(p_shape[1:]) or x_shape[0] > p_shape[0]:
        raise ValueError(f"the first {x_shape[0]} rows of a parameter of shape {tuple(p_shape)} added to a per-sample "
                         f"shape {x_shape}: the rows must match the first per-sample axis, the rest the trailing axes")
    padded = tuple(p_shape)
    return [_crop(x_shape, {1: (0, p_shape[0])}),
            ("entry_shift", {"normalized_shape": padded}, padded, {"bias": name}, {"bias": padded}),
            _crop(padded, {1: (0, x_shape[0])})]


def crop_rows(x_shape, axis, rows):
    """A ``crop`` step to the ``rows`` zero rows before ``x`` along ``axis`` (counted with the batch): all padding."""
    return _crop(x_shape, {axis: (-rows, 0)})


def broadcast_parameter(op, x_shape, p_shape):
    """(rule key, hyper, role) of ``x + p`` / ``x * p`` for a parameter ``p`` that broadcasts over the batch and
    leading axes: its shape, leading 1s dropped, must be the trailing per-sample shape of ``x``."""
    trailing = tuple(p_shape)
    while trailing and trailing[0] == 1 and len(trailing) > 0:
        trailing = trailing[1:]
    if len(p_shape) > len(x_shape) + 1 or tuple(x_shape[len(x_shape) - len(trailing):]) != trailing:
        raise ValueError(f"a parameter of shape {tuple(p_shape)} in '{op}' with a per-sample shape {x_shape}: only "
                         "parameters shaped like trailing per-sample axes (leading 1s allowed) are supported")
    key, role = {"add": ("entry_shift", "bias"), "mul": ("entry_scale", "weight")}[op]
    return key, {"normalized_shape": trailing or (1,)}, role
