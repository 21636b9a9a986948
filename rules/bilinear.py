"""Products of two activations: ``matmul`` / ``@`` / ``bmm`` and ``einsum`` with two tensor operands.

Both operands depend on the sample: ``A[n, ...]`` and ``B[n, ...]``. ``matmul`` sees each sample's leading axes as
one batch axis ``g`` (both operands carry the same leading sizes: no broadcasting), ``einsum`` states its equation
in index notation with the batch letter as ``n`` (``einsum_rule``).
"""
from math import prod

import sympy as sp

from .spec import A, B, Bilinear, g, i, j, k, n, Σ


def _matmul_views(h, x_shapes, y_shape):
    """A (G, I, J) @ B (G, J, K) -> Y (G, I, K), G the leading per-sample axes of both."""
    (*lead, rows, inner), (*_, _, cols) = x_shapes
    return {"A": (prod(lead), rows, inner), "B": (prod(lead), inner, cols), "Y": (prod(lead), rows, cols)}


BILINEAR = [
    Bilinear("matmul", out=(n, g, i, k), expr=Σ(A[n, g, i, j] * B[n, g, j, k], j), views=_matmul_views,
             forward="torch.matmul({x0}, {x1})", aliases=("bmm",)),
]


def _einsum_views(h, x_shapes, y_shape):
    """The operands' own per-sample shapes: the equation indexes them axis by axis."""
    return {"A": tuple(x_shapes[0]), "B": tuple(x_shapes[1]), "Y": tuple(y_shape)}


def einsum_rule(equation: str) -> Bilinear:
    """The rule of ``torch.einsum(equation, a, b)``: ``Y[n, out] = Σ_summed A[n, ...] B[n, ...]``.

    The equation must be explicit (``->``), without ``...``, and start every operand and the output with the
    same letter, the batch axis. Raises ValueError otherwise.
    """
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    operands = inputs.split(",")
    if not arrow or "." in equation or len(operands) != 2 or not all(s.isalpha() for s in (*operands, output)):
        raise ValueError(f"einsum '{equation}' is not supported: give two operands and the output explicitly "
                         "('nij,njk->nik'), without '...'")
    batch = output[:1]
    if not batch or any(s[:1] != batch for s in operands) or any(s.count(batch) != 1 for s in (*operands, output)):
        raise ValueError(f"einsum '{equation}' must keep the batch axis first in both operands and the output, "
                         "as a letter used nowhere else")
    if any(len(set(s)) != len(s) for s in (*operands, output)) or set(output) - set(inputs.replace(",", "")):
        raise ValueError(f"einsum '{equation}' repeats a letter within an operand or outputs a letter no operand has")
    letters = {letter: sp.Symbol(f"e_{letter}", integer=True) for letter in sorted(set(inputs.replace(",", "")))}
    letters[batch] = n
    summed = sorted(set(inputs.replace(",", "")) - set(output))
    product = A[tuple(letters[c] for c in operands[0])] * B[tuple(letters[c] for c in operands[1])]
    expr = Σ(product, *(letters[c] for c in summed)) if summed else product
    return Bilinear("einsum", out=tuple(letters[c] for c in output), expr=expr, views=_einsum_views,
                    forward="torch.einsum({equation}, {x0}, {x1})")
