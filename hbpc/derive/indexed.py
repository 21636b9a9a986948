"""Index notation to einsum.

An index expression is flattened into terms ``coeff · Π factors`` with a set of
summed indices. ``KroneckerDelta``s from differentiation are eliminated by
substituting a summed index. What remains lowers to one ``torch.einsum``.
"""
from dataclasses import dataclass
from string import ascii_letters

import sympy as sp


@dataclass(frozen=True)
class Term:
    """``coeff · Π factors``, summed over ``summed``; ``deltas`` are left-over δ(p, q)."""

    coeff: sp.Expr
    factors: tuple
    summed: frozenset
    deltas: tuple = ()


def _walk(expr, summed):
    if isinstance(expr, sp.Add):
        for arg in expr.args:
            yield from _walk(arg, summed)
    elif isinstance(expr, sp.Sum):
        yield from _walk(sp.expand(expr.function), summed | {lim[0] for lim in expr.limits})
    elif isinstance(expr, sp.Mul) and any(isinstance(a, (sp.Sum, sp.Add)) for a in expr.args):
        inner = [a for a in expr.args if isinstance(a, (sp.Sum, sp.Add))][0]
        rest = sp.Mul(*[a for a in expr.args if a is not inner])
        if isinstance(inner, sp.Sum):
            yield from _walk(sp.Sum(sp.expand(rest * inner.function), *inner.limits), summed)
        else:
            yield from _walk(sp.expand(rest * inner), summed)
    else:
        yield expr, summed


def _common_deltas(piecewise):
    """``Piecewise((a·δ, c), (b·δ, True)) → ([δ], Piecewise((a, c), (b, True)))`` (sympy folds it back inside a Sum)."""
    branches = [(sp.factor_terms(e), c) for e, c in piecewise.args]
    nonzero = [e for e, _ in branches if e != 0]  # a zero branch is a multiple of any delta
    shared = set.intersection(*({f for f in sp.Mul.make_args(e) if isinstance(f, sp.KroneckerDelta)}
                                for e in nonzero)) if nonzero else set()
    if not shared:
        return [], piecewise
    common = sp.Mul(*shared)
    return list(shared), sp.Piecewise(*((sp.cancel(e / common), c) for e, c in branches))


def _term(product, summed) -> Term:
    factors, deltas, coeff = [], [], sp.S.One
    for f in sp.Mul.make_args(product):
        if isinstance(f, sp.Indexed):
            factors.append(f)
        elif isinstance(f, sp.Pow) and isinstance(f.base, sp.Indexed) and f.exp.is_Integer and f.exp > 0:
            factors += [f.base] * int(f.exp)
        elif isinstance(f, sp.KroneckerDelta):
            deltas.append(f)
        elif isinstance(f, sp.Piecewise):
            shared, rest = _common_deltas(f)
            deltas += shared
            coeff *= rest
        else:
            coeff *= f
    return Term(coeff, tuple(factors), frozenset(summed), tuple(deltas))


def _eliminate_deltas(term: Term) -> Term:
    """Resolve ``Σ_p δ(p, q) f(p) = f(q)`` until only deltas between free indices remain."""
    factors, summed, kept, coeff = list(term.factors), set(term.summed), [], term.coeff
    deltas = list(term.deltas)
    while deltas:
        delta = deltas.pop()
        p, q = delta.args
        if p not in summed and q in summed:
            p, q = q, p
        if p in summed:
            summed.discard(p)
            coeff = coeff.subs(p, q)
            factors = [f.subs(p, q) for f in factors]
            deltas = [d.subs(p, q) for d in deltas]
            kept = [d.subs(p, q) for d in kept]
        elif p != q:
            kept.append(delta)
    kept = [d for d in kept if d != 1]
    return Term(coeff, tuple(factors), frozenset(summed), tuple(kept))


def _unique_bound(expr):
    """Rename every summation index to a fresh symbol, innermost first, so no two sums share one."""
    counter = iter(range(10**6))

    def rename(summand, *limits):
        fresh = {lim[0]: sp.Symbol(f"{lim[0]}_{next(counter)}", integer=True) for lim in limits}
        return sp.Sum(summand.xreplace(fresh), *((fresh[lim[0]], *lim[1:]) for lim in limits))

    return expr.replace(sp.Sum, rename)


def terms(expr) -> list:
    """The non-zero terms of ``expr`` with deltas eliminated."""
    out = []
    for product, summed in _walk(sp.expand(_unique_bound(expr)), frozenset()):
        if product == 0:
            continue
        out.append(_eliminate_deltas(_term(product, summed)))
    return out


def resolve_deltas(expr):
    """``expr`` rebuilt from its terms: every delta against a summed index resolved."""
    rebuilt = []
    for term in terms(expr):
        product = term.coeff * sp.Mul(*term.factors) * sp.Mul(*term.deltas)
        summed = sorted(term.summed, key=str)
        rebuilt.append(sp.Sum(product, *((idx, 0, sp.oo) for idx in summed)) if summed else product)
    return sp.Add(*rebuilt)


@dataclass(frozen=True)
class Einsum:
    """``coeff · torch.einsum(spec, *operands)``; operands named by their IndexedBase label."""

    spec: str
    operands: tuple
    coeff: sp.Expr = sp.S.One
    broadcast: tuple = ()

    def code(self, names: dict, out_shape: str = None) -> str:
        """The torch expression; ``out_shape`` (code) is needed when ``broadcast`` is set.

        ``broadcast`` lists output positions no operand carries (``J_b v`` repeats
        ``v`` over samples): they are inserted as size-1 axes and expanded.
        """
        args = ", ".join(names.get(op, op) for op in self.operands)
        inputs, output = self.spec.split("->")
        call = args if inputs == output else f'torch.einsum("{self.spec}", {args})'  # an identity: the operand
        if self.broadcast:
            rank = len(self.spec.split("->")[1].replace("...", "")) + len(self.broadcast)
            axes = ", ".join("None" if p in self.broadcast else ":" for p in range(rank))
            call = f"broadcast_trailing({call}[..., {axes}], {out_shape})"
        return call if self.coeff == 1 else f"{self.coeff} * {call}"


def _letters(indices):
    table = {}
    for idx in indices:
        if idx not in table:
            table[idx] = ascii_letters[len(table)]
    return table


def einsum_of(term: Term, out: tuple) -> Einsum:
    """Lower one term to an einsum producing indices ``out``.

    Every operand and the output get a ``...`` prefix, so any operand may carry
    leading dimensions (a batch of V tangents, or a tangent standing in for a weight).
    """
    if term.deltas:
        raise ValueError(f"cannot lower {term}: it keeps a delta between free indices")
    letters = _letters([idx for f in term.factors for idx in f.indices] + list(out))
    operand_specs = ["..." + "".join(letters[idx] for idx in f.indices) for f in term.factors]
    operands = [str(f.base.label) for f in term.factors]
    present = {idx for f in term.factors for idx in f.indices}
    broadcast = tuple(p for p, idx in enumerate(out) if idx not in present)
    result = "".join(letters[idx] for idx in out if idx in present)
    spec = ",".join(operand_specs) + "->..." + result
    return Einsum(spec, tuple(operands), term.coeff, broadcast)


def single_einsum(expr, out: tuple) -> Einsum:
    """Lower ``expr``, which must be a single term, to one einsum."""
    found = terms(expr)
    if len(found) != 1:
        raise ValueError(f"expected one term, got {len(found)} in {expr}")
    return einsum_of(found[0], out)
