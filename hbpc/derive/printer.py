"""Print sympy expressions as torch code.

Scalar rules print symbols as tensor names. Index-notation rules over a
per-sample vector (losses) put every index on the last axis: ``z[k]`` prints
as ``z`` and ``Σ_k f(z[k])`` as ``(f(z)).sum(-1, keepdim=True)``; likewise a normalization's
``Mean(f(x))`` prints as ``(f(x)).mean(-1, keepdim=True)``.
"""
import sympy as sp
from sympy.printing.pytorch import TorchPrinter


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
    """sympy's TorchPrinter with the conventions of generated hbpc code."""

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
        return self._print(expr.base.label)

    def _print_Sum(self, expr):
        return f"({self._print(expr.function)}).sum(-1, keepdim=True)"

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
    shared, reduced = sp.cse([named_exprs[name] for name in names], symbols=symbols, optimizations="basic")
    lines = [f"{sym} = {torch_code(value)}" for sym, value in shared]
    return lines, {name: torch_code(expr) for name, expr in zip(names, reduced)}
