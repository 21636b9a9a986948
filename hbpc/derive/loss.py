"""Derive a loss's gradient and Hessian-vector product with respect to the logits.

With ``ℓ(z, t)`` per sample: ``grad[j] = ∂ℓ/∂z[j]`` and
``hvp[i] = Σ_j ∂²ℓ/∂z[i]∂z[j] · v[j]``. Sums of exponentials are rewritten as
``exp(lse)`` with ``lse = logsumexp(z)``, so the emitted code never overflows.
"""
from dataclasses import dataclass

import sympy as sp

from hbpc.errors import HbpcError
from hbpc.rules.spec import t, z

from .elementwise import _through_sigmoid, almost_everywhere, hyper_values
from .indexed import _unique_bound, resolve_deltas
from .printer import UnprintableTerm, bound_indices, free_indices, torch_lines

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
        """CSE'd torch lines and ``{value, grad, hvp}`` expressions in ``z, t, v, lse`` with hyper-parameter values.

        A gradient equal for every class (``Σ_k z[k]``) is broadcast to ``z``'s shape.
        """
        values = hyper_values(hyper or {})
        exprs = {"value": self.value, "grad": self.grad, "hvp": self.hessian_product}
        lines, codes = torch_lines({name: expr.subs(values) for name, expr in exprs.items()}, "s")
        if _j not in self.grad.free_symbols:
            codes["grad"] = f"({codes['grad']}) + torch.zeros_like(z)"
        return lines, codes

    def fixed_indices(self) -> set:
        """The integer indices the loss reads directly (``z[0]``): each must be below the number of classes."""
        exprs = (self.value, self.grad, self.hessian_product)
        return {int(i) for e in exprs for a in e.atoms(sp.Indexed) for i in a.indices if i.is_Integer}


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


_REWRITE_OPS = 40  # the σ rewrite factors polynomials: beyond this size it costs minutes and rarely applies


def _without_overflow_here(expr):
    if not expr.atoms(sp.exp):
        return expr
    if sp.count_ops(expr) > _REWRITE_OPS:
        terms = sp.Add.make_args(expr)
        return sp.Add(*map(_without_overflow_here, terms)) if len(terms) > 1 else expr
    live = free_indices(expr)
    for candidate in _through_sigmoid(expr):
        # the rewrite factors and cancels: keep it only if no index escaped the sum that binds it
        if not candidate.atoms(sp.exp) and free_indices(candidate) == live and not live & bound_indices(candidate):
            return candidate
    return expr


def without_overflow(expr):
    """Logistic terms through σ and softplus (``log(1 + exp(a))``, ``exp(a)/(1 + exp(a))``) when that removes exp.

    Each sum's summand is rewritten on its own first, then the whole expression.
    """
    inside = expr.replace(lambda e: isinstance(e, sp.Sum),
                          lambda e: sp.Sum(_without_overflow_here(e.function), *e.limits))
    return _without_overflow_here(inside)


def _sum_each_term(body, limit):
    """``Σ_k Σ_terms Π factors`` as ``Σ_terms (Π factors without k) · Σ_k (Π factors with k)``."""
    index = limit[0]
    out = []
    for term in sp.Add.make_args(sp.expand(body)):
        inside, outside = [], []
        for factor in sp.Mul.make_args(term):
            (inside if index in factor.free_symbols else outside).append(factor)
        out.append(sp.Mul(*outside) * sp.Sum(sp.Mul(*inside), limit))
    return sp.Add(*out)


def separate_sums(expr):
    """Sums whose summand reads other live indices, split into one sum per index where the terms allow.

    ``Σ_k Σ_m z[k] z[m] → (Σ_k z[k]) (Σ_m z[m])`` and ``Σ_m (z[k] − z[m])² → z[k]² Σ_m 1 − 2 z[k] Σ_m z[m] + …``.
    A sum that reads only its own index is left as written.
    """

    def rebuild(e):
        body, limits = e.function, e.limits
        if len(limits) == 1 and not free_indices(body) - {limits[0][0]}:
            return e
        for limit in limits:  # innermost first
            body = _sum_each_term(body, limit)
        return body

    return expr.replace(lambda e: isinstance(e, sp.Sum), rebuild)


def _refuse(rule, term, problem: str, fix: str):
    raise HbpcError(f"loss rule '{rule.key}': {problem}: {term}", f"Loss('{rule.key}', {rule.ell}, ...)", fix)


def check_loss_rule(rule):
    """Refuse a per-sample loss ℓ(z, t) the printer cannot turn into torch code, naming the term."""
    ell = rule.ell
    if not isinstance(ell, sp.Expr):
        _refuse(rule, ell, "ℓ must be a sympy expression of z[k] and t[k]", "write ℓ with hbpc.rules.spec's z, t, k, Σ")
    for term in ell.atoms(sp.Indexed):
        if term.base not in (z, t):
            _refuse(rule, term, "a loss reads only the logits z[k] and the target t[k]", "use z and t from "
                    "hbpc.rules.spec")
        if len(term.indices) != 1:
            _refuse(rule, term, "z and t are per-sample vectors with one index", "write z[k] or z[0]")
        (index,) = term.indices
        if not (index.is_Symbol or (index.is_Integer and index >= 0)):
            _refuse(rule, term, "an index is a summed symbol or a non-negative integer", "write z[k] or z[0]")
    for total in ell.atoms(sp.Sum):
        for index, lower, upper in total.limits:
            if lower != 0 or upper != sp.oo:
                _refuse(rule, total, "sums run over all classes", "write Σ(f, k) from hbpc.rules.spec")
    if free_indices(ell):
        _refuse(rule, ell, f"index {', '.join(sorted(map(str, free_indices(ell))))} is not summed, so ℓ is not one "
                "number per sample", "sum it, e.g. Σ((z[k] - t[k])**2, k)")
    unknown = {s for s in ell.free_symbols if isinstance(s, sp.Symbol) and s.name not in rule.hyper
               and s not in (z.label, t.label)}
    if unknown:
        _refuse(rule, ell, f"symbols {', '.join(sorted(map(str, unknown)))} are neither z, t nor hyper-parameters",
                "name them in hyper={...} with their default values")
    if not any(term.base == z for term in ell.atoms(sp.Indexed)):
        _refuse(rule, ell, "ℓ does not read the logits z", "write ℓ as a function of z[k]")


def derive_loss(rule) -> LossDerivation:
    check_loss_rule(rule)
    grad = resolve_deltas(almost_everywhere(sp.diff(rule.ell, z[_j])))
    hessian = almost_everywhere(sp.diff(grad, z[_i]))
    hvp = resolve_deltas(sp.Sum(hessian * _v[_j], (_j, 0, sp.oo)))
    exprs = [separate_sums(pull_out_constants(without_overflow(stabilize(e)))) for e in (rule.ell, grad, hvp)]
    exprs[0] = separate_sums(without_overflow(stabilize(rule.ell)))
    atoms = set().union(*(e.free_symbols | {a.base for a in e.atoms(sp.Indexed)} for e in exprs))
    intermediates = {}
    if LSE in atoms or SOFTMAX in atoms:
        intermediates["lse"] = "torch.logsumexp(z, -1, keepdim=True)"
    if SOFTMAX in atoms:
        intermediates["softmax"] = "torch.exp(z - lse)"
    derivation = LossDerivation(*exprs, intermediates)
    try:
        derivation.code(rule.hyper)
    except UnprintableTerm as error:
        where = {name: e for name, e in zip(("ℓ", "∂ℓ/∂z", "∇²ℓ v"), exprs) if error.term in e.atoms(type(error.term))}
        _refuse(rule, error.term, f"{error.reason} (in {', '.join(where) or 'a derived expression'})",
                "rewrite ℓ as sums of terms that each read one summed index (or fixed indices such as z[0])")
    return derivation
