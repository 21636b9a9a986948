"""Derive the products of a ``Bilinear`` rule ``Y[out] = expr(A, B)``, linear in each of its two activations.

For each operand ``T`` (``A`` or ``B``, the other one ``U``) sympy differentiates ``Y[out]`` by ``T[a]`` and this
module lowers, like ``structured.py``,

* ``J_T v  = Σ_a ∂Y[out]/∂T[a] · v[a]``               (an einsum of ``U`` and ``v``),
* ``J_Tᵀ u = Σ_out u[out] · ∂Y[out]/∂T[a]``           (an einsum of ``U`` and ``u``),
* ``(R t)_T = Σ_{out,b} g[out] ∂²Y[out]/∂T[a]∂U[b] t[b]`` (an einsum of ``g`` and ``t``): the Hessian cross term,
  for the gradient ``g`` at the output and a tangent ``t`` of the other operand. ``∂²Y/∂T²`` is zero (derived:
  the rule must be linear in each operand), so this is the whole residual of the node.
"""
from dataclasses import dataclass

import sympy as sp

from hbpc.rules.spec import A, B

from .indexed import Einsum, single_einsum, terms

TANGENT, COTANGENT, GRADIENT, DIRECTION = (sp.IndexedBase(name) for name in ("v", "u", "g", "t"))


@dataclass(frozen=True)
class OperandDerivation:
    """Derived products of one operand; ``jvp``/``vjp`` read the other operand, ``residual`` reads ``g`` and ``t``."""

    jacobian: sp.Expr
    jvp: Einsum
    vjp: Einsum
    residual: Einsum


@dataclass(frozen=True)
class BilinearDerivation:
    operands: dict  # "A", "B" -> OperandDerivation
    cross: sp.Expr  # ∂²Y[out]/∂A[a]∂B[b], the Hessian cross term (a product of deltas: constant)


def _index(expr, base, prefix):
    (rank,) = {len(e.indices) for e in expr.atoms(sp.Indexed) if e.base == base}
    return tuple(sp.Symbol(f"{prefix}{p}", integer=True) for p in range(rank))


def _sum(expr, indices):
    return sp.Sum(expr, *((idx, 0, sp.oo) for idx in indices))


def _operand(expr, out, base, index, other, other_index) -> OperandDerivation:
    jacobian = sp.diff(expr, base[index])
    if terms(sp.diff(jacobian, base[_index(expr, base, "c")])):
        raise ValueError(f"a Bilinear rule must be linear in {base}")
    cross = sp.diff(jacobian, other[other_index])
    return OperandDerivation(
        jacobian,
        single_einsum(_sum(jacobian * TANGENT[index], index), out),
        single_einsum(_sum(jacobian * COTANGENT[out], out), index),
        single_einsum(_sum(GRADIENT[out] * cross * DIRECTION[other_index], out + other_index), index))


def derive_bilinear(rule) -> BilinearDerivation:
    a, b = _index(rule.expr, A, "a"), _index(rule.expr, B, "b")
    operands = {"A": _operand(rule.expr, rule.out, A, a, B, b), "B": _operand(rule.expr, rule.out, B, b, A, a)}
    cross = sp.diff(rule.expr, A[a], B[b])
    if not terms(cross):
        raise ValueError(f"rule '{rule.key}' does not multiply its operands (∂²Y/∂A∂B = 0): state it as Structured")
    return BilinearDerivation(operands, cross)
