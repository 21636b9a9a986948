"""Trace a model with torch.fx, specialized to the example input's shapes.

hbpc compiles a model for the per-sample shapes of its example input, so sizes read in ``forward``
(``B, T, C = x.size()``, ``x.shape[-1]``, ``x.dim()``) are answered with the example's concrete ints
instead of fx proxies. Code written the way people write it then traces as it runs: ``self.bias[:, :, :T, :T]``
slices a buffer by a traced size (a constant, folded by fx into the graph), ``q.view(B, T, nh, C // nh)``
is a view with constant sizes. The IR reads only per-sample shapes (the batch size the example happens to
have never reaches the generated code; ``lower.py`` checks that every op keeps the batch first).

Every node is evaluated on the example input while it is traced (``node.meta[VALUE]``). Where that fails
(a bad example input, an op that raises), the value stays unknown and the node's sizes stay symbolic, as in
plain ``torch.fx``: shape propagation then reports the failure with its node.
"""
import contextlib
import sys
from pathlib import Path

import torch
import torch.fx as fx
from torch.fx import _symbolic_trace

# Evaluation runs the user's ops untraced: fx's patches of Module.__call__ (and wrapped functions) are lifted.
_UNTRACED = getattr(_symbolic_trace, "_maybe_revert_all_patches", contextlib.nullcontext)

HBPC_DIR = str(Path(__file__).resolve().parent.parent)
VALUE = "hbpc_value"
CONSTANT = "hbpc_constant"
_UNKNOWN = object()
# Tensor attributes answered with the example's concrete values (sizes and what does not depend on them).
_CONCRETE = frozenset({"shape", "size", "dim", "ndim", "ndimension", "dtype", "device"})


class _ConcreteProxy(fx.Proxy):
    """A proxy that answers size queries with the example's concrete sizes."""

    def __getattr__(self, name):
        value = self.node.meta.get(VALUE, _UNKNOWN)
        if name in _CONCRETE and isinstance(value, torch.Tensor):
            return getattr(value, name)
        return super().__getattr__(name)

    def __len__(self):
        value = self.node.meta.get(VALUE, _UNKNOWN)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return len(value)
        return super().__len__()


class ShapeTracer(fx.Tracer):
    """An fx tracer that records the user's ``file:line`` for every node (cheaper than stack traces) and
    specializes sizes to ``example_input`` (None: plain symbolic tracing)."""

    def __init__(self, example_input=None):
        super().__init__()
        self.example_input = example_input

    def is_leaf_module(self, module, qualified_name):
        """Standard torch modules, and user modules whose class name has a user rule (``--rules``), are leaves.

        Any other class is traced into, even if its name is a built-in rule's.
        """
        from hbpc.rules import USER_KEYS

        return super().is_leaf_module(module, qualified_name) or type(module).__name__.lower() in USER_KEYS

    def proxy(self, node):
        return _ConcreteProxy(node, self)

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        frame = sys._getframe(1)
        while frame is not None:
            filename = frame.f_code.co_filename
            if filename.startswith(HBPC_DIR):
                break
            if "/torch/" not in filename:
                node.meta["hbpc_source"] = f"{filename}:{frame.f_lineno}"
                break
            frame = frame.f_back
        if self.example_input is not None and node.op != "output":
            node.meta[VALUE] = self._evaluate(node)
        return node

    def _evaluate(self, node):
        """The node's value on the example input, or ``_UNKNOWN`` if an input is unknown or the op fails."""
        if node.op == "placeholder":
            first = not any(n.op == "placeholder" for n in node.graph.nodes if n is not node)
            return self.example_input if first else _UNKNOWN
        if node.op == "get_attr":
            try:
                with _UNTRACED():
                    return _attribute(self.root, node.target)
            except AttributeError:
                return _UNKNOWN
        unknown = []
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: _value_of(n, unknown))
        if unknown:
            return _UNKNOWN
        try:
            with torch.no_grad(), _UNTRACED():
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                return self.root.get_submodule(node.target)(*args, **kwargs)
        except Exception:  # the user's code may raise anything: shape propagation reports it with its node
            return _UNKNOWN


def _attribute(root, path):
    for name in path.split("."):
        root = getattr(root, name)
    return root


def _value_of(node, unknown):
    value = node.meta.get(VALUE, _UNKNOWN)
    if value is _UNKNOWN:
        unknown.append(node)
    return value


def forget_values(graph, root=None):
    """Drop the example values kept on the nodes (the IR reads the shapes shape propagation records).

    With the traced ``root``, a tensor that depends on neither the input nor a parameter (a mask sliced from a
    buffer, ``self.bias[:, :, :T, :T] == 0``) keeps its value as ``meta[CONSTANT]``: it is the same for every call.
    """
    parameters = {name for name, _ in root.named_parameters()} if root is not None else set()
    varying = set()
    for node in graph.nodes:
        value = node.meta.pop(VALUE, None)
        if root is None:
            continue
        if (node.op == "placeholder" or (node.op == "get_attr" and node.target in parameters)
                or (node.op == "call_module" and any(True for _ in root.get_submodule(node.target).parameters()))
                or any(a in varying for a in node.all_input_nodes)):
            varying.add(node)
        elif isinstance(value, torch.Tensor):
            node.meta[CONSTANT] = value
