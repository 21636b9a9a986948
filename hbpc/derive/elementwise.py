"""Derive φ′ and φ″ of an elementwise rule, in ``x`` or, where cheaper, in ``y = φ(x)``."""
from dataclasses import dataclass

import numpy as np
import sympy as sp

from hbpc.rules.spec import x, y

from .printer import torch_code

_PROBE = np.linspace(-4.0, 4.0, 41)


@dataclass(frozen=True)
class ElementwiseDerivation:
    """``d1 = φ′``, ``d2 = φ″`` as sympy expressions of ``var`` (``x`` or ``y``)."""

    phi: sp.Expr
    d1: sp.Expr
    d2: sp.Expr

    @property
    def code(self) -> dict:
        return {"d1": torch_code(self.d1), "d2": torch_code(self.d2)}

    def uses(self, name: str) -> bool:
        """Whether φ′ or φ″ reads the input (``"x"``) or the output (``"y"``)."""
        symbol = {"x": x, "y": y}[name]
        return symbol in self.d1.free_symbols | self.d2.free_symbols


def almost_everywhere(expr: sp.Expr) -> sp.Expr:
    """Drop point masses: ``DiracDelta`` is zero almost everywhere."""
    return expr.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.S.Zero)


def _candidates_in_y(phi: sp.Expr, expr: sp.Expr) -> list:
    rewrites = [expr.subs(phi, y)]
    try:
        rewrites += [sp.simplify(expr.subs(x, inverse)) for inverse in sp.solve(sp.Eq(phi, y), x)]
    except (NotImplementedError, ValueError):
        pass
    forms = [form for r in rewrites for form in (r, sp.expand(r), sp.factor(r))]
    return [form for form in forms if x not in form.free_symbols]


def _agrees(phi: sp.Expr, in_x: sp.Expr, in_y: sp.Expr) -> bool:
    """The rewrite is valid where it matters: equal on a probe grid (catches non-invertible φ)."""
    fx = sp.lambdify(x, in_x, "numpy")
    fy = sp.lambdify(y, in_y, "numpy")
    phi_values = sp.lambdify(x, phi, "numpy")(_PROBE)
    with np.errstate(all="ignore"):
        a = np.broadcast_to(np.asarray(fx(_PROBE), dtype=float), _PROBE.shape)
        b = np.broadcast_to(np.asarray(fy(phi_values), dtype=float), _PROBE.shape)
    return bool(np.allclose(a, b, atol=1e-9, equal_nan=False))


def cheapest(phi: sp.Expr, expr: sp.Expr) -> sp.Expr:
    """``expr`` or an equivalent expression in ``y``, whichever has fewer operations."""
    best = expr
    for candidate in _candidates_in_y(phi, expr):
        if sp.count_ops(candidate) < sp.count_ops(best) and _agrees(phi, expr, candidate):
            best = candidate
    return best


def derive_elementwise(rule) -> ElementwiseDerivation:
    d1 = almost_everywhere(sp.diff(rule.phi, x))
    d2 = almost_everywhere(sp.diff(d1, x))
    return ElementwiseDerivation(rule.phi, cheapest(rule.phi, d1), cheapest(rule.phi, d2))
