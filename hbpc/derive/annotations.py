"""Stage 2 over a graph: derive every node's rule once and attach what plan and emit read, as printed data.

``annotate(graph)`` sets every ``hbpc.ir.Node``'s ``derived`` (one annotation per node, by rule kind) and
``graph.graph["loss_derived"]``. Later stages read only these: torch code already printed (in the fixed names
``W``, ``b``, ``X``, ``v``, ``u``, ``S``, ``g``, ``z``, ``t`` or in the template slots ``{x}``/``{y}``), formulas for
docstrings, the names each printed expression reads (Python tokens of the code, never a regex), and the
derived classification: what the input map is (matmul, convolution, ..., generic), whether a block factor is a
Gram matrix, how a Kronecker block splits. No later stage imports sympy or parses an einsum spec.
"""
import io
import keyword
import tokenize
from dataclasses import dataclass
from math import prod

import sympy as sp

from hbpc import ir
from hbpc.errors import HbpcError
from hbpc.kinds import handler
from hbpc.rules.spec import Bilinear, Elementwise, Normalization, Selection, Structured, x as X_SYMBOL, y as Y_SYMBOL

from . import derive
from .elementwise import hyper_values
from .printer import formula, torch_code
from .structured import classify, is_gram, kronecker_split


@dataclass(frozen=True)
class Printed:
    """Torch code of a derived expression: the local lines it needs first, the expression, the names both read."""

    code: str
    lines: tuple = ()
    reads: frozenset = frozenset()


@dataclass(frozen=True)
class Product:
    """A derived contraction ``coeff · call``, ``call`` broadcast over ``broadcast_axes`` (``[..., None, :]``
    indices) to the output shape when no operand carries an output axis (``J_b v`` repeats ``v``)."""

    call: str  # torch.einsum(...), a matrix product (A @ B.mT) or an operand itself
    coeff: str = ""  # "" for 1
    broadcast_axes: str = ""
    broadcast: tuple = ()  # the output positions no operand carries (size-1 axes expanded to the output shape)


@dataclass(frozen=True)
class BlockMaps:
    """How ``Σ J_θᵀ S J_θ`` is computed: dense (``matrix``), Kronecker ``A ⊗ B`` (``factors``) or an operator."""

    kind: str
    matrix: Product = None
    factors: tuple = ()  # (A from S, B from the samples' X)
    split: int = 0  # leading axes of the parameter's view that index A
    gram: bool = False  # B = Σ_n X[n, i] X[n, j]: rank N, kept as its root


@dataclass(frozen=True)
class TensorMaps:
    """J v and Jᵀ u for one tensor T of a structured rule (the input "X" or a parameter role)."""

    jacobian: str  # ∂Y/∂T as a formula
    jvp: Product
    vjp: Product
    sample_dependent: bool
    couples_input: bool = False  # ∂²Y/∂X∂θ ≠ 0
    block: BlockMaps = None


@dataclass(frozen=True)
class StructuredAnnotation:
    kind: str  # the derived input map: matmul, convolution, transposed convolution or generic
    expr: str  # Y[out] = ... as a formula
    views: dict  # the rule's tensor views at this node's shapes: {"X": ..., "Y": ..., "W": ..., "b": ...}
    tensors: dict  # "X" and each parameter role -> TensorMaps


@dataclass(frozen=True)
class ElementwiseAnnotation:
    kind: str
    phi: str  # φ as code in the slot {x}
    d1: str  # φ′ as code in the slots {x}, {y} (a number: broadcast like {x})
    residual: Printed  # φ″ in x and y, reading the names it needs; None where φ″ = 0
    doc: str


@dataclass(frozen=True)
class NormalizationProduct:
    """J v, Jᵀ u or R t of a normalization: CSE lines and the expression over one group, and the cached tensors
    it reads (in order; the residual also reads the output gradient g)."""

    formula: str
    lines: tuple
    code: str
    cached: tuple


@dataclass(frozen=True)
class NormalizationAnnotation:
    kind: str
    reads: tuple  # cached tensors the products read: x, y and the statistics used
    statistics: tuple  # (name, code, formula) per statistic, in definition order
    products: dict  # "jvp", "vjp", "residual" -> NormalizationProduct
    phi: str


@dataclass(frozen=True)
class OperandMaps:
    """One operand of a bilinear node: torch code in ``A``/``B`` (the other operand), ``v``, ``u``, ``g``, ``t``."""

    jacobian: str  # ∂Y/∂T as a formula
    jvp: str  # J_T v, reading the other operand
    vjp: str  # J_Tᵀ u
    residual: str  # Σ_out g[out] ∂²Y[out]/∂T∂U t for a tangent t of the other operand U


@dataclass(frozen=True)
class BilinearAnnotation:
    kind: str
    expr: str  # Y[out] = ... as a formula
    views: dict  # {"A": ..., "B": ..., "Y": ...} at this node's shapes
    operands: dict  # "A", "B" -> OperandMaps


@dataclass(frozen=True)
class SelectionAnnotation:
    kind: str


@dataclass(frozen=True)
class LossAnnotation:
    """The loss's printed expressions in z (logits), t (targets), v (a direction), C (classes)."""

    intermediates: dict  # name -> code, computed once per batch (lse, softmax)
    scale: Printed  # the reduction's factor in N and C
    forward_lines: tuple  # the locals value and gradient need
    value: Printed
    grad: Printed
    hvp: Printed
    doc: str


def reads(code: str) -> frozenset:
    """The Python names ``code`` reads (no attributes, keyword arguments or Python keywords)."""
    tokens = [token for token in tokenize.generate_tokens(io.StringIO(code).readline)
              if token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER)]
    return frozenset(token.string for k, token in enumerate(tokens)
                     if token.type == tokenize.NAME and not keyword.iskeyword(token.string)
                     and (k == 0 or tokens[k - 1].string != ".")
                     and (k + 1 == len(tokens) or tokens[k + 1].string != "="))


def _printed(lines, code) -> Printed:
    return Printed(code, tuple(lines), reads("\n".join([*lines, code])))


def _needed(shared, codes) -> list:
    """The CSE lines ``codes`` depend on, directly or through later lines, in order."""
    wanted, kept = set().union(*(reads(c) for c in codes)), []
    for line in reversed(shared):
        target, expression = line.split(" = ", 1)
        if target in wanted:
            kept.insert(0, line)
            wanted |= reads(expression)
    return kept


def _matrix_product(einsum):
    """``A @ B`` for a plain matrix product ``...ik,...kj->...ij`` in any operand layout (``.mT`` where an operand's
    letters run the other way), else None: the same contraction without einsum's dispatch and permute copies."""
    inputs, out = einsum.spec.replace("...", "").split("->")
    operands = inputs.split(",")
    shared = set(operands[0]) & set(operands[1]) if len(operands) == 2 else set()
    if len(shared) != 1 or len(out) != 2 or any(len(letters) != 2 for letters in operands):
        return None
    (k,) = shared
    i, j = out
    first, second = (0, 1) if i in operands[0] else (1, 0)
    if k in out or j not in operands[second]:
        return None

    def matrix(position, rows, cols):
        name = einsum.operands[position]
        return name if operands[position] == rows + cols else f"{name}.mT"

    return f"{matrix(first, i, k)} @ {matrix(second, k, j)}"


def _product(einsum, constants=None, matmul=False) -> Product:
    coeff = einsum.coeff if constants is None else sp.nsimplify(einsum.coeff).subs(constants)
    inputs, output = einsum.spec.split("->")
    call = ", ".join(einsum.operands) if inputs == output else f'torch.einsum("{einsum.spec}", {", ".join(einsum.operands)})'
    if matmul and coeff == 1 and not einsum.broadcast:
        call = _matrix_product(einsum) or call
    axes = ""
    if einsum.broadcast:
        rank = len(output.replace("...", "")) + len(einsum.broadcast)
        axes = ", ".join("None" if p in einsum.broadcast else ":" for p in range(rank))
    return Product(call, "" if coeff == 1 else str(coeff), axes, tuple(einsum.broadcast))


def _block(block) -> BlockMaps:
    if block.kind == "dense":
        return BlockMaps("dense", matrix=_product(block.matrix))
    if block.kind == "kronecker":
        a, b = block.factors
        return BlockMaps("kronecker", factors=(_product(a), _product(b)), split=kronecker_split(block), gram=is_gram(b))
    return BlockMaps("operator")


def _structured(name, node, graph) -> StructuredAnnotation:
    rule = node.rule
    derivation = derive(rule)
    constants = rule.constants(node.hyper) if rule.constants else {}
    tensors = {
        role: TensorMaps(formula(tensor.jacobian), _product(tensor.jvp, constants, True),
                         _product(tensor.vjp, constants, True), tensor.sample_dependent, tensor.couples_input,
                         _block(tensor.block) if tensor.block is not None else None)
        for role, tensor in derivation.tensors.items()}
    expr = f"Y[{', '.join(map(str, rule.out))}] = {formula(rule.expr)}"
    return StructuredAnnotation(classify(derivation), expr, rule.views(node.hyper, node.x_shape, node.y_shape),
                                tensors)


_SLOTS = {X_SYMBOL: sp.Symbol("{x}", real=True), Y_SYMBOL: sp.Symbol("{y}", real=True)}


def _elementwise(name, node, graph) -> ElementwiseAnnotation:
    rule, derivation = node.rule, derive(node.rule)
    values = hyper_values(node.hyper)
    d1 = derivation.d1.subs(values).subs(_SLOTS)
    d1_code = f"torch.full_like({{x}}, {torch_code(d1)})" if d1.is_number else torch_code(d1)
    d2 = derivation.d2.subs(values)
    residual = None
    if d2 != 0:
        residual = Printed(torch_code(d2), (), frozenset(str(s) for s in (X_SYMBOL, Y_SYMBOL)
                                                          if s in derivation.d2.free_symbols))
    doc = f"φ = {formula(rule.phi)},  φ′ = {formula(derivation.d1)},  φ″ = {formula(derivation.d2)}"
    return ElementwiseAnnotation("elementwise", torch_code(rule.phi.subs(values).subs(_SLOTS)), d1_code, residual, doc)


def _normalization(name, node, graph) -> NormalizationAnnotation:
    derivation = derive(node.rule)
    cached = [str(s) for s in derivation.reads()]
    values = hyper_values(node.hyper)
    statistics = tuple((str(s), torch_code(definition.subs(values)), formula(definition))
                       for s, definition in derivation.statistics)
    products = {}
    for which in ("jvp", "vjp", "residual"):
        expr = getattr(derivation, which)
        shared, out = derivation.code(which, node.hyper)
        used = tuple(str(s) for s in derivation.reads() if s in expr.free_symbols) + (("g",) if which == "residual" else ())
        products[which] = NormalizationProduct(formula(expr), tuple(shared), out, used)
    return NormalizationAnnotation("normalization", tuple(cached), statistics, products, formula(node.rule.phi))


def _bilinear(name, node, graph) -> BilinearAnnotation:
    rule, derivation = node.rule, derive(node.rule)
    names = {key: key for key in ("A", "B", "v", "u", "g", "t")}
    operands = {key: OperandMaps(formula(d.jacobian), d.jvp.code(names), d.vjp.code(names), d.residual.code(names))
                for key, d in derivation.operands.items()}
    expr = f"Y[{', '.join(map(str, rule.out))}] = {formula(rule.expr)}"
    return BilinearAnnotation("bilinear", expr, rule.views(node.hyper, node.x_shapes, node.y_shape), operands)


def _selection(name, node, graph) -> SelectionAnnotation:
    return SelectionAnnotation(f"selection ({node.rule.primitive})")


# Each rule kind's annotation, registered once: (name, node, graph) -> its annotation.
ANNOTATIONS = {Elementwise: _elementwise, Structured: _structured, Normalization: _normalization,
               Selection: _selection, Bilinear: _bilinear}


def _loss(graph) -> LossAnnotation:
    rule = graph.graph["loss_rule"]
    derivation = derive(rule)
    classes = prod(ir.node(graph, graph.graph["order"][-1]).y_shape)
    outside = sorted(i for i in derivation.fixed_indices() if i >= classes)
    if outside:
        raise HbpcError(f"loss rule '{rule.key}' reads entry {outside[0]} of the logits, but the model has {classes} "
                        "outputs per sample", f"Loss('{rule.key}', {rule.ell}, ...)",
                        "index entries 0 to C-1 only, or compile a model with more outputs")
    N, C = sp.symbols("N C", positive=True, integer=True)
    scale = torch_code(sp.nsimplify(rule.scale[graph.graph["reduction"]](N, C)))
    shared, exprs = derivation.code(graph.graph["loss_hyper"])
    value, grad, hvp = (_printed(_needed(shared, [exprs[k]]), exprs[k]) for k in ("value", "grad", "hvp"))
    doc = f"ℓ(z, t) = {formula(rule.ell)};  Hv = {formula(derivation.hessian_product)}"
    return LossAnnotation(dict(derivation.intermediates), _printed([], scale),
                          tuple(_needed(shared, [exprs["value"], exprs["grad"]])), value, grad, hvp, doc)


def annotate(graph):
    """Attach every node's derived quantities (``Node.derived``) and the loss's (``graph.graph["loss_derived"]``)."""
    for node in ir.nodes(graph):
        ir.update(graph, node.name, derived=handler(ANNOTATIONS, node.rule, "annotation")(node.name, node, graph))
    graph.graph["loss_derived"] = _loss(graph)
    return graph
