"""Derive a loss's gradient and Hessian-vector product with respect to the logits.

With ``ℓ(z, t)`` per sample: ``grad[j] = ∂ℓ/∂z[j]`` and
``hvp[i] = Σ_j ∂²ℓ/∂z[i]∂z[j] · v[j]``. Sums of exponentials are rewritten as
``exp(lse)`` with ``lse = logsumexp(z)``, so the emitted code never overflows.
"""
from dataclasses import dataclass

import sympy as sp

from hbpc.rules.spec import t, z

from .elementwise import _through_sigmoid, almost_everywhere, hyper_values
from .indexed import _unique_bound, resolve_deltas
from .printer import torch_lines

LSE = sp.Symbol("lse", real=True)
SOFTMAX = sp.IndexedBase("softmax")
_j, _i = sp.symbols("j i", integer=True)
_v = sp.IndexedBase("v")


@dataclass(frozen=True)
class LossDerivation:
    """sympy expressions per sample; ``intermediates`` maps extra names to torch code."""

    value: sp.Expr
    grad: sp.Expr
    hessian_product: sp.Expr
    intermediates: dict

    def code(self, hyper: dict = None) -> tuple[list[str], dict]:
        """CSE'd torch lines and ``{value, grad, hvp}`` expressions in ``z, t, v, lse`` with hyper-parameter values."""
        values = hyper_values(hyper or {})
        exprs = {"value": self.value, "grad": self.grad, "hvp": self.hessian_product}
        return torch_lines({name: expr.subs(values) for name, expr in exprs.items()}, "s")


def _is_sum_of_exp(e) -> bool:
    if not isinstance(e, sp.Sum) or len(e.limits) != 1 or not isinstance(e.function, sp.exp):
        return False
    arg = e.function.args[0]
    return isinstance(arg, sp.Indexed) and arg.base == z and arg.indices == (e.limits[0][0],)


def _is_exp_of_logit(e) -> bool:
    return isinstance(e, sp.exp) and isinstance(e.args[0], sp.Indexed) and e.args[0].base == z


def stabilize(expr):
    """Rewrite exponentials of logits through ``lse = logsumexp(z)`` so nothing overflows.

    ``Σ_k exp(z[k]) → exp(lse)`` and ``exp(z[j]) → softmax[j] · exp(lse)``;
    the ``exp(lse)`` factors then cancel.
    """
    bound = _unique_bound(expr)
    replaced = bound.replace(_is_sum_of_exp, lambda e: sp.exp(LSE))
    if replaced == bound:
        return bound
    in_softmax = replaced.replace(_is_exp_of_logit, lambda e: SOFTMAX[e.args[0].indices] * sp.exp(LSE))
    return sp.powsimp(sp.expand(in_softmax))


def pull_out_constants(expr):
    """``Σ_j a · f(j) → a · Σ_j f(j)`` for factors ``a`` free of ``j`` (the printer sums the last axis)."""

    def split(summand, *limits):
        bound = {lim[0] for lim in limits}
        inside, outside = [], []
        for factor in sp.Mul.make_args(summand):
            (inside if factor.free_symbols & bound else outside).append(factor)
        return sp.Mul(*outside) * sp.Sum(sp.Mul(*inside), *limits)

    return sp.expand(expr).replace(sp.Sum, split)


def without_overflow(expr):
    """Logistic terms through σ and softplus (``log(1 + exp(a))``, ``exp(a)/(1 + exp(a))``) when that removes exp."""
    for candidate in _through_sigmoid(expr):
        if not candidate.atoms(sp.exp):
            return candidate
    return expr


def derive_loss(rule) -> LossDerivation:
    grad = resolve_deltas(almost_everywhere(sp.diff(rule.ell, z[_j])))
    hessian = almost_everywhere(sp.diff(grad, z[_i]))
    hvp = resolve_deltas(sp.Sum(hessian * _v[_j], (_j, 0, sp.oo)))
    exprs = [pull_out_constants(without_overflow(stabilize(e))) for e in (rule.ell, grad, hvp)]
    exprs[0] = without_overflow(stabilize(rule.ell))
    atoms = set().union(*(e.free_symbols | {a.base for a in e.atoms(sp.Indexed)} for e in exprs))
    intermediates = {}
    if LSE in atoms or SOFTMAX in atoms:
        intermediates["lse"] = "torch.logsumexp(z, -1, keepdim=True)"
    if SOFTMAX in atoms:
        intermediates["softmax"] = "torch.exp(z - lse)"
    return LossDerivation(*exprs, intermediates)
