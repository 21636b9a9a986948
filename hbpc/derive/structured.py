"""Derive the products of a map that is linear in its input (index notation).

For every tensor ``T`` the rule reads (the input view ``X`` and each parameter),
sympy differentiates ``Y[out]`` with respect to ``T[a]`` and this module lowers

* ``jvp_T(v)[out] = Σ_a ∂Y[out]/∂T[a] · v[a]``   (forward mode, ``J v``)
* ``vjp_T(u)[a]   = Σ_out u[out] · ∂Y[out]/∂T[a]`` (reverse mode, ``Jᵀ u``)

to einsums, and records derived facts: whether ``Y`` is linear in ``T``
(its second derivative vanishes), whether the input Jacobian depends on the
sample, and how the HBP parameter block ``Σ J_θᵀ S J_θ`` factorises.
"""
from dataclasses import dataclass

import networkx as nx
import sympy as sp

from .indexed import Einsum, einsum_of, single_einsum, terms

TANGENT_IN, TANGENT_OUT, CURVATURE = sp.IndexedBase("v"), sp.IndexedBase("u"), sp.IndexedBase("S")


@dataclass(frozen=True)
class ParameterBlock:
    """How ``B = (1/N) Σ_n J_{θ,n}ᵀ S J_{θ,n}`` is computed.

    ``kind`` is ``"dense"`` (``matrix`` is an einsum of ``S`` only),
    ``"kronecker"`` (``B = A ⊗ Bf`` with ``A = factors[0]`` from ``S`` and
    ``Bf = factors[1]`` from the sample tensors, summed over ``n``) or
    ``"operator"`` (no structure: use ``vjp(S · jvp(v))``).
    """

    kind: str
    matrix: Einsum = None
    factors: tuple = ()
    sandwich: sp.Expr = None


@dataclass(frozen=True)
class TensorDerivation:
    """Derived products and facts for one tensor ``T`` of a rule."""

    jacobian: sp.Expr
    jvp: Einsum
    vjp: Einsum
    linear: bool
    sample_dependent: bool
    block: ParameterBlock = None
    couples_input: bool = False  # ∂²Y/∂X∂θ ≠ 0: the full Hessian has a parameter-input cross term


@dataclass(frozen=True)
class StructuredDerivation:
    tensors: dict  # "X" or parameter role -> TensorDerivation


def _rank(expr, base) -> int:
    ranks = {len(e.indices) for e in expr.atoms(sp.Indexed) if e.base == base}
    (rank,) = ranks
    return rank


def _fresh(prefix, count):
    return tuple(sp.Symbol(f"{prefix}{j}", integer=True) for j in range(count))


def _sum(expr, indices):
    return sp.Sum(expr, *((idx, 0, sp.oo) for idx in indices)) if indices else expr


def _uses_sample(einsum_terms, batch, skip) -> bool:
    return any(batch in f.indices for term in einsum_terms for f in term.factors if f.base not in skip)


def _components(factors):
    """Connected groups of factors that share indices."""
    graph = nx.Graph()
    graph.add_nodes_from(range(len(factors)))
    for a in range(len(factors)):
        for b in range(a + 1, len(factors)):
            if set(factors[a].indices) & set(factors[b].indices):
                graph.add_edge(a, b)
    return [tuple(factors[j] for j in sorted(c)) for c in nx.connected_components(graph)]


def _parameter_block(jacobian, out, batch, index, index2) -> ParameterBlock:
    """Derive ``Σ_{out,out'} ∂Y[out]/∂θ[a] S[out, out'] ∂Y[out']/∂θ[a']`` for one sample."""
    features = tuple(idx for idx in out if idx != batch)
    primed = _fresh("q", len(features))
    second = jacobian.subs(dict(zip(index, index2)), simultaneous=True).subs(
        dict(zip(features, primed)), simultaneous=True)
    sandwich = _sum(jacobian * CURVATURE[features + primed] * second, features + primed)
    (term,) = terms(sandwich)
    result = index + index2
    if term.deltas:
        return ParameterBlock("operator", sandwich=sandwich)
    if not any(batch in f.indices for f in term.factors):
        return ParameterBlock("dense", matrix=einsum_of(term, result), sandwich=sandwich)
    groups = _components(term.factors)
    if len(groups) == 2:
        with_s = [grp for grp in groups if any(f.base == CURVATURE for f in grp)]
        if len(with_s) == 1:
            curv, data = with_s[0], [grp for grp in groups if grp is not with_s[0]][0]
            curv_idx = {idx for f in curv for idx in f.indices}
            split = sum(1 for idx in index if idx in curv_idx)
            lead = index[:split] + index2[:split]
            trail = index[split:] + index2[split:]
            if set(lead) <= curv_idx and not set(trail) & curv_idx:
                a = einsum_of(type(term)(sp.S.One, curv, term.summed), lead)
                b = einsum_of(type(term)(term.coeff, data, term.summed), trail)
                return ParameterBlock("kronecker", factors=(a, b), sandwich=sandwich)
    return ParameterBlock("operator", sandwich=sandwich)


def derive_tensor(expr, out, base, batch, is_parameter, input_base) -> TensorDerivation:
    rank = _rank(expr, base)
    index, index2 = _fresh("a", rank), _fresh("b", rank)
    jacobian = sp.diff(expr, base[index])
    linear = not terms(sp.diff(jacobian, base[index2]))
    if not linear:
        raise ValueError(f"rule is not linear in {base}: structured rules must be")
    jvp_expr = _sum(jacobian * TANGENT_IN[index], index)
    vjp_expr = _sum(jacobian * TANGENT_OUT[out], out)
    jvp = single_einsum(jvp_expr, out)
    vjp = single_einsum(vjp_expr, index)
    dependent = _uses_sample(terms(jvp_expr), batch, {TANGENT_IN})
    block = _parameter_block(jacobian, out, batch, index, index2) if is_parameter else None
    input_rank = _rank(expr, input_base)
    couples = is_parameter and bool(terms(sp.diff(jacobian, input_base[_fresh("c", input_rank)])))
    return TensorDerivation(jacobian, jvp, vjp, linear, dependent, block, couples)


def derive_structured(rule, input_base, batch) -> StructuredDerivation:
    expr = rule.expr
    tensors = {"X": derive_tensor(expr, rule.out, input_base, batch, False, input_base)}
    for role, base in rule.params.items():
        tensors[role] = derive_tensor(expr, rule.out, base, batch, True, input_base)
    return StructuredDerivation(tensors)


# The derived input jvps that are a known map: Y[n, o] = Σ_i W[o, i] v[n, i] on the flat input (a matrix product, also
# at every position l),
# and Σ_{c,k} W[g, o, c, k] X[n, g, c, k, l] over unfolded patches (transposed: W[g, c, o, k]), a convolution.
_INPUT_MAPS = {
    ("...ab,...cb->...ca", ("W", "v")): "matmul",
    ("...ab,...cdb->...cda", ("W", "v")): "shared matmul",  # Y[n, l, o] = Σ_i W[o, i] v[n, l, i]: one W per position
    ("...abcd,...eacdf->...eabf", ("W", "v")): "convolution",
    ("...abcd,...eabdf->...eacf", ("W", "v")): "transposed convolution",
}


def classify(derivation: StructuredDerivation) -> str:
    """What the derived input map is: "matmul", "shared matmul" (at every position), "convolution", "transposed
    convolution" or "generic"."""
    jvp = derivation.tensors["X"].jvp
    return _INPUT_MAPS.get((jvp.spec, jvp.operands), "generic") if jvp.coeff == 1 else "generic"


def is_gram(einsum: Einsum) -> bool:
    """Whether the einsum is Σ_n X[n, i] X[n, j], a Gram matrix over samples (the rank-N factor x̄ x̄ᵀ)."""
    inputs, output = einsum.spec.replace("...", "").split("->")
    first, second = inputs.split(",") if "," in inputs else ("", "")
    return (einsum.operands == ("X", "X") and len(first) == len(second) == 2 and first[0] == second[0]
            and output == first[1] + second[1])


def kronecker_split(block: ParameterBlock) -> int:
    """How many leading axes of the parameter's view index the factor A of B = A ⊗ B."""
    return len(block.factors[0].spec.split("->")[1].replace("...", "")) // 2
