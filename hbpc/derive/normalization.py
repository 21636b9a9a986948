"""Derive the products of a normalization: J v, Jᵀ u and the residual product R t.

A rule states ``y = φ(x, s₁, …)`` per entry with per-sample statistics ``s_k = Mean(h_k)``.
Unfolding the statistics makes ``y`` an expression of one entry ``x`` and of means over all of a
group's entries. Two derivative operators act on such expressions through sympy's partial derivatives,
with ``M = Mean(m)`` ranging over the outermost means of ``e``:

* forward, along a per-entry tangent ``d``:  ``∂_d e = ∂e/∂x · d + Σ_M ∂e/∂M · Mean(∂_d m)``;
* reverse, the gradient of ``Σ_j e_j`` in entry ``a`` of a per-entry variable ``w``:
  ``∇_w e = ∂e/∂w + Σ_M Mean(∂e/∂M) · ∇_w m`` (the chain rule through ``∂M/∂w_a = ∇_w m / D``).

Hence ``J v = ∂_v y``; ``Jᵀ u = ∇_v (u · J v)`` because ``Σ_j u_j (J v)_j = uᵀ J v``; and
``R t = ∇_x (g · J t)`` for the residual ``R = Σ_i g_i ∂²y_i/∂x∂x`` of the output gradient ``g``.
Every result is brought to a normal form: means are linear (sums split, per-sample factors move out)
and the means that define the statistics are read back as the statistics (``Mean(x) = μ``,
``Mean(x²) = var + μ²``). Where φ has a single inverse in ``x``, the form rewritten in the output
``y`` (``x = φ⁻¹(y)`` everywhere, also inside means) is kept if it is shorter: for layer norm it
removes ``x`` and ``μ``, as in ``J v = (v − Mean(v) − y·Mean(y·v)) / sqrt(var + ε)``.
"""
from dataclasses import dataclass

import sympy as sp

from hbpc.rules.spec import Mean, x, y

from .elementwise import hyper_values
from .printer import torch_lines

TANGENT, COTANGENT, GRADIENT, DIRECTION = sp.symbols("v u g t", real=True)
_ENTRY = {x, y, TANGENT, COTANGENT, GRADIENT, DIRECTION}  # symbols that vary over a group's entries


@dataclass(frozen=True)
class NormalizationDerivation:
    """Per-entry expressions in ``x`` or ``y``, the statistics and the rule's hyper-parameters.

    ``jvp`` reads the tangent ``v``, ``vjp`` the cotangent ``u``, ``residual`` (``R t``) the direction
    ``t`` and the output gradient ``g``; ``statistics`` are the rule's ``(s_k, Mean(h_k))`` pairs.
    """

    statistics: tuple
    jvp: sp.Expr
    vjp: sp.Expr
    residual: sp.Expr

    def reads(self) -> list:
        """The cached tensors the products read, in order: ``x``, ``y`` and the statistics they use."""
        used = set().union(*(e.free_symbols for e in (self.jvp, self.vjp, self.residual)))
        return [s for s in (x, y, *(s for s, _ in self.statistics)) if s in used]

    def code(self, name: str, hyper: dict = None) -> tuple[list[str], str]:
        """CSE'd torch lines and the expression of ``jvp``, ``vjp`` or ``residual`` with hyper-parameter values."""
        lines, exprs = torch_lines({name: getattr(self, name).subs(hyper_values(hyper or {}))}, "s")
        return lines, exprs[name]


def _without_means(expr):
    """``expr`` with each outermost mean as a fresh symbol, and ``{symbol: mean}`` for those left."""
    symbols = {mean: sp.Dummy("M") for mean in expr.atoms(Mean)}
    flat = expr.xreplace(symbols)
    return flat, {s: mean for mean, s in symbols.items() if s in flat.free_symbols}


def forward_derivative(expr, tangent):
    """``∂_d e = ∂e/∂x · d + Σ_M ∂e/∂M · Mean(∂_d m)``: the derivative of ``expr`` along ``tangent``."""
    flat, means = _without_means(expr)
    out = sp.diff(flat, x) * tangent
    for symbol, mean in means.items():
        out += sp.diff(flat, symbol) * Mean(forward_derivative(mean.args[0], tangent))
    return out.xreplace(means)


def gradient(expr, wrt):
    """``∇_w e = ∂e/∂w + Σ_M Mean(∂e/∂M) · ∇_w m``: entry ``a`` of the gradient of ``Σ_j e_j`` by ``w``."""
    flat, means = _without_means(expr)
    out = sp.diff(flat, wrt)
    for symbol, mean in means.items():
        out += Mean(sp.diff(flat, symbol).xreplace(means)) * gradient(mean.args[0], wrt)
    return out.xreplace(means)


def _per_entry(factor) -> bool:
    """Whether a factor varies over the entries: it reads an entry symbol outside every mean."""
    return bool(_without_means(factor)[0].free_symbols & _ENTRY)


def _split_mean(argument):
    """``Mean(Σ c·f) = Σ c·Mean(f)`` for per-sample ``c``; ``Mean(c) = c``."""
    total = sp.S.Zero
    for term in sp.Add.make_args(sp.expand(linear_means(argument))):
        factors = sp.Mul.make_args(term)
        entry = sp.Mul(*(f for f in factors if _per_entry(f)))
        total += sp.Mul(*(f for f in factors if not _per_entry(f))) * (entry if entry == 1 else Mean(entry))
    return total


def linear_means(expr):
    """``expr`` with every mean split into means of per-entry monomials (means are linear)."""
    return expr.replace(Mean, _split_mean)


def statistic_means(statistics) -> dict:
    """``{Mean(m): value}`` for the mean each statistic introduces, solved for in the statistics.

    Each ``s_k = Mean(h_k)``, split into means of monomials, has exactly one mean the earlier
    statistics do not give: ``μ = Mean(x)``; ``var = Mean(x²) − μ²``, so ``Mean(x²) = var + μ²``.
    """
    known = {}
    for symbol, definition in statistics:
        value = sp.expand(linear_means(definition)).xreplace(known)
        (new,) = value.atoms(Mean)
        (known[new],) = sp.solve(sp.Eq(symbol, value), new)
    return known


def _unfold(expr, statistics):
    """``expr`` with every statistic replaced by its definition (means of ``x`` only)."""
    for symbol, definition in reversed(statistics):
        expr = expr.subs(symbol, definition)
    return expr


def _normal(expr, known):
    return sp.expand(linear_means(expr)).xreplace(known)


def _shortest(expr, phi, known, statistics):
    """The normal form of ``expr``, or its rewrite in ``y`` when φ has one inverse in ``x`` and it is shorter (or as
    short and reads fewer cached tensors: log-softmax's ``v − D·Mean(v·exp(y))`` reads no ``exp(x)``, which overflows)."""
    in_x = sp.simplify(_normal(expr, known))
    inverses = sp.solve(sp.Eq(phi, y), x)
    if len(inverses) != 1:
        return in_x
    in_y = sp.simplify(_normal(in_x.xreplace({x: inverses[0]}), known))
    cached = {x, y, *(s for s, _ in statistics)}
    return min((in_x, in_y), key=lambda e: (sp.count_ops(e), len(e.free_symbols & cached)))


def derive_normalization(rule) -> NormalizationDerivation:
    y_of_x = _unfold(rule.phi, rule.statistics)
    known = statistic_means(rule.statistics)
    jvp = forward_derivative(y_of_x, TANGENT)
    vjp = gradient(COTANGENT * jvp, TANGENT)
    residual = gradient(GRADIENT * jvp.xreplace({TANGENT: DIRECTION}), x)
    return NormalizationDerivation(rule.statistics,
                                   *(_shortest(e, rule.phi, known, rule.statistics) for e in (jvp, vjp, residual)))
