"""Derive φ′ and φ″ of an elementwise rule and pick the form to emit.

Candidates for each derivative: the expression in ``x``; rewritten in the output
``y = φ(x)`` (often cheaper: σ′ = y(1−y)); rewritten through ``s = σ(a)`` for every
exponential ``exp(k·a)`` (``exp(a) = s/(1−s)``), which keeps ``exp`` from overflowing.
A candidate must agree with the ``x`` form on a probe grid (so a non-invertible φ
cannot be rewritten in ``y``); among those, the one finite at the most extreme inputs,
then the one with fewest operations, wins. Hyper-parameters stay symbols and are
substituted when code is printed.
"""
import warnings
from dataclasses import dataclass

import numpy as np
import sympy as sp

from hbpc.rules.spec import x, y

from .printer import Sigmoid, Softplus, torch_code

_PROBE = np.linspace(-4.0, 4.0, 41) + 0.0123
_EXTREME = np.array([-1000.0, -100.0, -40.0, 40.0, 100.0, 1000.0])
_NUMPY = [{"Sigmoid": lambda a: 1 / (1 + np.exp(-a)), "Softplus": lambda a: np.logaddexp(0, a)}, "numpy", "scipy"]
_W = sp.Wild("w")


@dataclass(frozen=True)
class ElementwiseDerivation:
    """``d1 = φ′``, ``d2 = φ″`` as sympy expressions of ``x`` and/or ``y`` and the rule's hyper-parameters."""

    phi: sp.Expr
    d1: sp.Expr
    d2: sp.Expr

    def code(self, hyper: dict = None) -> dict:
        """Torch code for φ′ and φ″ with hyper-parameter values substituted."""
        values = hyper_values(hyper or {})
        return {"d1": torch_code(self.d1.subs(values)), "d2": torch_code(self.d2.subs(values))}

    def uses(self, name: str) -> bool:
        """Whether φ′ or φ″ reads the input (``"x"``) or the output (``"y"``)."""
        symbol = {"x": x, "y": y}[name]
        return symbol in self.d1.free_symbols | self.d2.free_symbols


def almost_everywhere(expr: sp.Expr) -> sp.Expr:
    """Drop point masses: ``DiracDelta`` is zero almost everywhere."""
    return expr.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.S.Zero)


def zero_at_kinks(expr: sp.Expr) -> sp.Expr:
    """φ″ is 0 at a kink, where a two-branch ``Piecewise`` switches (``x = k`` for a condition ``x > k``).

    That is torch autograd's value: its double backward masks both sides strictly (ELU/SELU: φ″(0) = 0, where the
    derived ``Piecewise`` would give the ``x <= 0`` branch's α). φ′ keeps the branch the rule's condition selects,
    as torch's backward does (ReLU 0, LeakyReLU slope, ELU α, Hardtanh 0 at ±limits).
    """
    relations = (sp.StrictGreaterThan, sp.GreaterThan, sp.StrictLessThan, sp.LessThan)

    def split(piecewise):
        pieces = piecewise.args
        if len(pieces) != 2 or pieces[1].cond is not sp.true or not isinstance(pieces[0].cond, relations):
            return piecewise
        (first, condition), (other, _) = pieces
        above, below = sp.Gt(condition.lhs, condition.rhs), sp.Lt(condition.lhs, condition.rhs)
        upper, lower = (first, other) if isinstance(condition, (sp.StrictGreaterThan, sp.GreaterThan)) else (other, first)
        return sp.Piecewise((upper, above), (lower, below), (sp.S.Zero, True))

    return expr.replace(lambda e: isinstance(e, sp.Piecewise), split)


_REWRITE_OPS = 100  # the largest built-in derivative (GELU-tanh's φ″) has 83
_INVERTIBLE_OPS = 8  # only small φ are inverted symbolically (sp.solve is slow on large ones)


def _nesting(expr) -> int:
    """How deeply functions of ``x`` other than exp are applied to one another (roots count):
    ``tanh(x)`` and ``log(1 + exp(x))`` 1, ``sin(tanh(x))`` and ``sqrt(1 + tanh(x)**2)`` 2."""
    inner = max((_nesting(arg) for arg in expr.args), default=0)
    applied = (isinstance(expr, sp.Function) and not isinstance(expr, sp.exp)) or (
        expr.is_Pow and not expr.exp.is_Integer and x in expr.base.free_symbols)
    return inner + 1 if applied and x in expr.free_symbols else inner


def _in_y(phi, expr) -> list:
    rewrites = [expr.subs(phi, y)]
    if (sp.count_ops(phi) > _INVERTIBLE_OPS or phi.has(sp.Piecewise, sp.Max, sp.Min, sp.Abs) or _nesting(phi) > 1
            or sp.srepr(phi).count(sp.srepr(x)) > 1):
        return rewrites  # nested functions or several x (sin(tanh(x)), x·σ(x)) cost sympy minutes and rarely invert
    try:
        rewrites += [sp.simplify(expr.subs(x, inverse)) for inverse in sp.solve(sp.Eq(phi, y), x, check=False)]
    except (NotImplementedError, ValueError, TypeError):
        pass
    return rewrites


def _through_sigmoid(expr) -> list:
    """``expr`` with ``log(1 + exp(a))`` as softplus and every ``exp(k·a)`` as ``(σ(a) / (1 − σ(a)))^k``."""
    s = sp.Dummy("s")
    expr = expr.replace(sp.log(1 + sp.exp(_W)), Softplus(_W))
    candidates = [expr]
    for base in {e.args[0] for e in expr.atoms(sp.exp)}:
        def as_sigmoid(e, base=base):
            ratio = sp.cancel(e.args[0] / base)
            return (s / (1 - s)) ** ratio if ratio.is_Integer else e

        rewritten = sp.factor(sp.cancel(expr.replace(lambda e: isinstance(e, sp.exp), as_sigmoid)))
        if s in rewritten.free_symbols:
            candidates.append(rewritten.subs(s, Sigmoid(base)))
    return candidates


def hyper_values(hyper: dict) -> dict:
    """``{symbol: value}``; integral floats become integers so code reads ``x`` rather than ``1.0*x``."""
    return {sp.Symbol(k, real=True): (sp.Integer(int(v)) if float(v).is_integer() else sp.Float(v))
            for k, v in hyper.items() if isinstance(v, (int, float))}


def _evaluate(expr, phi, points, hyper):
    values = hyper_values(hyper)
    f = sp.lambdify((x, y), expr.subs(values), _NUMPY)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        phi_values = sp.lambdify(x, phi.subs(values), _NUMPY)(points)
        out = f(points, np.broadcast_to(np.asarray(phi_values, dtype=float), points.shape))
        return np.broadcast_to(np.asarray(out, dtype=float), points.shape)


def best_form(phi, expr, hyper) -> sp.Expr:
    """The emitted form of ``expr``: valid, then finite at extreme inputs, then cheapest."""
    reference = _evaluate(expr, phi, _PROBE, hyper)
    candidates = [expr]
    if sp.count_ops(expr) > _REWRITE_OPS:  # factoring a large derivative costs minutes; print it as derived
        return expr
    for rewrite in _in_y(phi, expr) + _through_sigmoid(expr):
        for form in (rewrite, sp.expand(rewrite), sp.factor(rewrite)):
            if x in form.free_symbols and y in form.free_symbols:
                continue
            if np.allclose(_evaluate(form, phi, _PROBE, hyper), reference, atol=1e-9, rtol=1e-9):
                candidates.append(form)

    def cost(form):
        blowups = int(np.sum(~np.isfinite(_evaluate(form, phi, _EXTREME, hyper))))
        return blowups, sp.count_ops(form), len(sp.srepr(form))

    return min(candidates, key=cost)


def derive_elementwise(rule) -> ElementwiseDerivation:
    d1 = almost_everywhere(sp.diff(rule.phi, x))
    d2 = zero_at_kinks(almost_everywhere(sp.diff(d1, x)))
    return ElementwiseDerivation(rule.phi, best_form(rule.phi, d1, rule.hyper), best_form(rule.phi, d2, rule.hyper))
