"""Print sympy expressions as torch code.

Scalar rules print symbols as tensor names. Index-notation rules over a per-sample vector
(losses: ``z``, ``t``, ``v`` of shape ``(..., N, C)``) put the one index that is live at a point
on the last axis:

=======================  ==========================================================
``z[j]``, ``j`` free      ``z`` (the free index of a gradient or product is the last axis)
``z[0]``                  ``z[..., 0, None]`` (a per-sample scalar, shape ``(..., N, 1)``)
``Σ_k f(z[k])``           ``(f(z)).sum(-1, keepdim=True)``; ``f`` may hold fixed indices and inner sums
``Σ_k c`` (no ``k``)      ``(c) * z.shape[-1]``
``δ(j, 0)``, ``j`` free   ``(torch.arange(C) == 0)`` as a one-hot row of ``z``'s dtype
=======================  ==========================================================

Anything else (two live indices at once, a sum over a sub-range, a tensor with two indices)
raises ``UnprintableTerm`` naming the term; ``derive`` turns that into a compile-time error.
A normalization's ``Mean(f(x))`` prints as ``(f(x)).mean(-1, keepdim=True)``.
"""
import re

import sympy as sp
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.pytorch import TorchPrinter
from sympy.printing.str import StrPrinter


class UnprintableTerm(ValueError):
    """A term of an index expression that has no torch form under the printer's conventions."""

    def __init__(self, term, reason: str):
        self.term, self.reason = term, reason
        super().__init__(f"cannot print {term}: {reason}")


def free_indices(expr) -> set:
    """The symbols indexing a tensor or a delta in ``expr`` that no sum binds (the live indices)."""
    places = [i for a in expr.atoms(sp.Indexed) for i in a.indices]
    places += [i for d in expr.atoms(sp.KroneckerDelta) for i in d.args]
    return {s for place in places for s in place.free_symbols} & expr.free_symbols


def bound_indices(expr) -> set:
    """The integer symbols bound by some sum inside ``expr``."""
    return {limit[0] for e in expr.atoms(sp.Sum) for limit in e.limits}


class Sigmoid(sp.Function):
    """σ(a) = 1/(1 + exp(−a)), only used to print derived expressions stably (never differentiated)."""


class Softplus(sp.Function):
    """log(1 + exp(a)), only used to print derived expressions stably (never differentiated)."""


def _like(expr) -> str:
    """A tensor variable of ``expr`` whose dtype and device constants must follow (never an index)."""
    tensors = {str(a.base.label) for a in expr.atoms(sp.Indexed)}
    tensors |= {str(s) for s in expr.free_symbols if not s.is_integer and not isinstance(s, sp.Indexed)}
    return sorted(tensors)[0]


class TorchCodePrinter(TorchPrinter):
    """sympy's TorchPrinter with the conventions of generated hbpc code.

    ``like`` names the per-sample vector whose last axis an index runs over (its size, device, dtype).
    """

    def __init__(self, settings=None, like: str = "z"):
        super().__init__(settings)
        self._like, self._axis = like, None

    def doprint(self, expr, assign_to=None):
        live = free_indices(expr) if isinstance(expr, sp.Basic) else set()
        if len(live) > 1:
            raise UnprintableTerm(expr, f"indices {sorted(map(str, live))} are all free; at most one index may be")
        if live & bound_indices(expr):
            raise UnprintableTerm(expr, f"index {sorted(map(str, live & bound_indices(expr)))[0]} is read outside "
                                        "the sum that binds it")
        self._axis = next(iter(live), None)
        return super().doprint(expr, assign_to)

    def _print_Sigmoid(self, expr):
        return f"torch.sigmoid({self._print(expr.args[0])})"

    def _print_sign(self, expr):
        return f"torch.sign({self._print(expr.args[0])})"

    def _print_Abs(self, expr):
        return f"torch.abs({self._print(expr.args[0])})"

    def _print_DiracDelta(self, expr):
        return "0"

    def _print(self, expr, **kwargs):
        if isinstance(expr, sp.Basic) and expr.is_number and expr.is_real and not (
                expr.is_Rational and abs(expr.q) < 1000 and abs(expr.p) < 1000):
            return repr(float(expr))
        return super()._print(expr, **kwargs)

    def _print_Heaviside(self, expr):
        arg = self._print(expr.args[0])
        return f"({arg} > 0).to({_like(expr)}.dtype)"

    def _print_Min(self, expr):
        return self._extremum(expr, "max", "torch.minimum", sp.Min)

    def _extremum(self, expr, bound, pairwise, kind):
        """Max/Min of a tensor and a number as ``torch.clamp``, of tensors as ``torch.maximum``/``minimum``."""
        numbers = [a for a in expr.args if a.is_number]
        tensors = [self._print(a) for a in expr.args if not a.is_number]
        if len(numbers) == 1 and len(tensors) == 1:
            return f"torch.clamp({tensors[0]}, {bound}={self._print(numbers[0])})"
        return f"{pairwise}({self._print(expr.args[0])}, {self._print(kind(*expr.args[1:]))})"

    def _print_Piecewise(self, expr):
        like = _like(expr)
        out = self._branch(expr.args[-1].expr, like)
        for branch in reversed(expr.args[:-1]):
            out = f"torch.where({self._print(branch.cond)}, {self._branch(branch.expr, like)}, {out})"
        return out

    def _branch(self, value, like):
        return f"{like}.new_tensor({self._print(value)})" if value.is_number else self._print(value)

    def _print_Softplus(self, expr):
        return f"torch.nn.functional.softplus({self._print(expr.args[0])})"

    def _print_Max(self, expr):
        return self._extremum(expr, "min", "torch.maximum", sp.Max)

    def _print_Indexed(self, expr):
        if len(expr.indices) != 1:
            raise UnprintableTerm(expr, "a loss reads per-sample vectors, so every tensor takes one index")
        (index,) = expr.indices
        name = self._print(expr.base.label)
        if index.is_Integer and index >= 0:
            return f"{name}[..., {int(index)}, None]"
        if index == self._axis and index.is_Symbol:
            return name
        raise UnprintableTerm(expr, f"index {index} is neither a non-negative integer, nor summed by the "
                                    "innermost sum around it, nor the one free index")

    def _print_Sum(self, expr):
        if len(expr.limits) != 1:
            raise UnprintableTerm(expr, "a sum over several indices whose summand does not separate into one "
                                        "factor per index")
        index, lower, upper = expr.limits[0]
        if lower != 0 or upper != sp.oo:
            raise UnprintableTerm(expr, "sums run over all entries, Σ(f, k); a sub-range has no torch form")
        body = expr.function
        if index not in body.free_symbols:
            return f"({self._print(body)}) * {self._like}.shape[-1]"
        others = free_indices(body) - {index}
        if others:
            raise UnprintableTerm(expr, f"the summand couples the summed index {index} with "
                                        f"{', '.join(sorted(map(str, others)))}, which it does not sum")
        outer, self._axis = self._axis, index
        try:
            return f"({self._print(body)}).sum(-1, keepdim=True)"
        finally:
            self._axis = outer

    def _print_KroneckerDelta(self, expr):
        fixed = [a for a in expr.args if a.is_Integer and a >= 0]
        if len(fixed) != 1 or self._axis not in expr.args or not self._axis.is_Symbol:
            raise UnprintableTerm(expr, "only a delta between the free index and a non-negative integer has a "
                                        "torch form (deltas against summed indices are eliminated first)")
        like = self._like
        return f"(torch.arange({like}.shape[-1], device={like}.device) == {int(fixed[0])}).to({like}.dtype)"

    def _print_Mean(self, expr):
        argument = self._print(expr.args[0])
        return f"{argument if expr.args[0].is_Symbol else f'({argument})'}.mean(-1, keepdim=True)"

    def _print_Pow(self, expr):
        base, exp = expr.args
        if exp == -1:
            return f"1 / {self.parenthesize(base, sp.printing.precedence.PRECEDENCE['Pow'])}"
        if exp == 2:
            b = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Pow"])
            return f"{b}**2"
        return super()._print_Pow(expr)


def torch_code(expr) -> str:
    """One torch expression for ``expr``."""
    return TorchCodePrinter().doprint(expr)


def torch_lines(named_exprs: dict, prefix: str) -> tuple[list[str], dict]:
    """CSE over ``{name: expr}``: returns assignment lines and ``{name: code}``.

    Common subexpressions become locals ``<prefix>0``, ``<prefix>1``, ...
    """
    names = list(named_exprs)
    symbols = sp.numbered_symbols(prefix)
    exprs = [named_exprs[name] for name in names]
    summed = set().union(*(bound_indices(e) for e in exprs if isinstance(e, sp.Basic)))
    # a subexpression holding a summed index means nothing outside its sum: never share it
    shared, reduced = sp.cse(exprs, symbols=symbols, optimizations="basic", ignore=tuple(summed))
    lines = [f"{sym} = {torch_code(value)}" for sym, value in shared]
    return lines, {name: torch_code(expr) for name, expr in zip(names, reduced)}


class _FormulaPrinter(StrPrinter):
    """Math for docstrings: δ[a, b] for Kronecker deltas, Σ_i f for sums over a whole index range."""

    def _print_KroneckerDelta(self, expr):
        return f"δ[{self._print(expr.args[0])}, {self._print(expr.args[1])}]"

    def _print_Sum(self, expr):
        function, indices = expr.function, []
        for limit in expr.limits:
            function, index = _readable_index(function, limit[0])
            indices.append(self._print(index))
        return f"Σ_{', '.join(indices)} {self.parenthesize(function, PRECEDENCE['Mul'])}"


def _readable_index(function, index):
    """``index`` renamed without the numeric suffixes derive adds to keep sums apart (``j_3_2`` → ``j``, or ``j′``
    where ``j`` is taken in ``function``): (renamed function, new index)."""
    base = re.sub(r"(_\d+)+$", "", index.name) or index.name
    taken = {symbol.name for symbol in function.free_symbols} - {index.name}
    name = next(base + "′" * k for k in range(len(taken) + 2) if base + "′" * k not in taken)
    renamed = sp.Symbol(name, **index.assumptions0)
    return function.xreplace({index: renamed}), renamed


def formula(expr) -> str:
    """``expr`` as one line of readable math (docstrings of generated code)."""
    return _FormulaPrinter().doprint(expr).replace("\n", " ")
