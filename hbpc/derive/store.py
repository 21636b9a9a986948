"""Derivations as JSON text that cannot execute code when read back.

A derivation is a tree of frozen dataclasses (``ElementwiseDerivation``, ``Einsum``, ...), tuples,
dicts, strings, numbers and sympy expressions. ``dumps`` writes dataclasses as
``{"dataclass": name, "fields": {...}}`` and expressions as ``{"sympy": srepr}``.
``loads`` rebuilds them from a fixed list of dataclasses, and reads each ``srepr`` with a small
evaluator over Python's ``ast``: only calls of sympy classes (and hbpc's own printing functions)
on numbers, names of symbols and nested calls, so a crafted cache file can at worst fail to load.
"""
import ast
import dataclasses
import json

import sympy as sp

from hbpc.rules.spec import Mean

from .bilinear import BilinearDerivation, OperandDerivation
from .elementwise import ElementwiseDerivation
from .indexed import Einsum
from .loss import LossDerivation
from .normalization import NormalizationDerivation
from .printer import Sigmoid, Softplus
from .structured import ParameterBlock, StructuredDerivation, TensorDerivation

_DATACLASSES = {cls.__name__: cls for cls in (ElementwiseDerivation, Einsum, LossDerivation, NormalizationDerivation,
                                              ParameterBlock, StructuredDerivation, TensorDerivation,
                                              BilinearDerivation, OperandDerivation)}
# sympy's expression classes by name (no functions such as sympify or parse_expr), and hbpc's own.
_CLASSES = {name: value for name, value in vars(sp).items()
            if isinstance(value, type) and issubclass(value, sp.Basic)}
_CLASSES.update({"Sigmoid": Sigmoid, "Softplus": Softplus, "Mean": Mean, "ExprCondPair": sp.functions.elementary.piecewise.ExprCondPair,
                 "StrictGreaterThan": sp.StrictGreaterThan, "StrictLessThan": sp.StrictLessThan,
                 "GreaterThan": sp.GreaterThan, "LessThan": sp.LessThan})
_CONSTANTS = {"oo": sp.oo, "zoo": sp.zoo, "nan": sp.nan, "pi": sp.pi, "E": sp.E, "I": sp.I,
              "true": sp.true, "false": sp.false, "EulerGamma": sp.EulerGamma}
_LARGEST_POWER = 1000  # a crafted Pow(10, 10**30) would hang sympy's evaluation
_NAMED_BY_STRING = {"Symbol", "Dummy", "Float"}  # the only classes that take a string: a name or digits


class UnsafeEntry(ValueError):
    """A cache entry that is not a derivation written by ``dumps``."""


def _encode(value):
    if dataclasses.is_dataclass(value) and type(value).__name__ in _DATACLASSES:
        return {"dataclass": type(value).__name__,
                "fields": {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, sp.Basic):
        return {"sympy": sp.srepr(value)}
    if isinstance(value, (tuple, list)):
        return {"tuple": [_encode(item) for item in value]}
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError(f"cannot store a dict with non-string keys: {value!r}")
        return {"dict": {key: _encode(item) for key, item in value.items()}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot store {type(value).__name__} in the derivation cache")


def dumps(derivation) -> str:
    """JSON text of a derivation (or ``None``)."""
    return json.dumps(_encode(derivation), sort_keys=True)


def _literal(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (bool, int, float, str)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
            and isinstance(node.operand.value, (int, float)) and not isinstance(node.operand.value, bool):
        return -node.operand.value
    raise UnsafeEntry(f"not a literal: {ast.dump(node)[:80]}")


def _evaluate(node):
    """The sympy object of one ``srepr`` syntax node, built from whitelisted classes only."""
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise UnsafeEntry(f"unknown name {node.id!r}")
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_evaluate(item) for item in node.elts)
    if isinstance(node, ast.Constant) or isinstance(node, ast.UnaryOp):
        value = _literal(node)
        if isinstance(value, str):
            raise UnsafeEntry("a string outside Symbol/Dummy/Float")
        return value
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CLASSES):
        raise UnsafeEntry(f"not a sympy constructor: {ast.dump(node)[:80]}")
    name = node.func.id
    if name in _NAMED_BY_STRING:
        args = [_literal(node.args[0]), *map(_evaluate, node.args[1:])] if node.args else []
        if args and not isinstance(args[0], str) and name != "Float":
            raise UnsafeEntry(f"{name} needs a name")
    else:
        args = [_evaluate(arg) for arg in node.args]
    if name == "Pow" and len(args) == 2 and isinstance(args[1], sp.Integer) and abs(args[1]) > _LARGEST_POWER:
        raise UnsafeEntry("a power too large to evaluate")
    keywords = {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
    if len(keywords) != len(node.keywords) or any(isinstance(v, str) for v in keywords.values()):
        raise UnsafeEntry("keyword arguments must be numbers or booleans")
    return _CLASSES[name](*args, **keywords)


def expression(text: str):
    """The sympy expression of an ``srepr`` string, without ``eval``."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise UnsafeEntry("not an srepr string") from None
    return _evaluate(tree.body)


def _decode(data):
    if not isinstance(data, dict) or len(data) != (2 if "dataclass" in data else 1):
        raise UnsafeEntry(f"unexpected entry {str(data)[:80]}")
    if "dataclass" in data:
        cls = _DATACLASSES.get(data["dataclass"])
        fields = data.get("fields")
        if cls is None or not isinstance(fields, dict):
            raise UnsafeEntry(f"unknown dataclass {data.get('dataclass')!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        if not set(fields) <= names:
            raise UnsafeEntry(f"unknown fields of {cls.__name__}: {sorted(set(fields) - names)}")
        return cls(**{name: _decode(value) for name, value in fields.items()})
    (kind, value), = data.items()
    if kind == "sympy" and isinstance(value, str):
        return expression(value)
    if kind == "tuple" and isinstance(value, list):
        return tuple(_decode(item) for item in value)
    if kind == "dict" and isinstance(value, dict):
        return {key: _decode(item) for key, item in value.items()}
    if kind == "value" and (value is None or isinstance(value, (bool, int, float, str))):
        return value
    raise UnsafeEntry(f"unexpected entry {str(data)[:80]}")


def loads(text: str):
    """The derivation ``dumps`` wrote; ``UnsafeEntry`` for anything else (garbage, other objects)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise UnsafeEntry("not JSON") from None
    try:
        return _decode(data)
    except (TypeError, ValueError, AttributeError, RecursionError, sp.SympifyError) as error:
        if isinstance(error, UnsafeEntry):
            raise
        raise UnsafeEntry(f"cannot rebuild the derivation: {error}") from None
