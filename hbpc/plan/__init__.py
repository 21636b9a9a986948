"""Stage 3: decide what the generated code computes, caches and keeps, from the graph and its derivations.

``plan(graph)`` returns a ``Plan``; the emitter prints it and decides nothing of this itself:

* **upstream**: a tensor needs a gradient, a tangent and a curvature only if some parameter lies upstream of it
  (the first layer's input curvature is never formed);
* **caches**: per node, what ``forward_backward`` keeps and which quantities read it (``Plan.caches_for``);
* **blocks**: per parameter, the representation of its HBP block (Kronecker, dense or matrix-free), from the
  derived factorisation, and matrix-free where the structured form alone would exceed ``memory_limit``;
* **kronecker**: KFAC-family layers, from the derived classification of the input map (a matrix product or a
  convolution, one group, parameters used once), not from op names;
* **lowering**: convolutions whose derived maps torch's convolution kernels compute (patches larger than the input);
* **loss**: the loss's curvature (its exact Hessian; a sampled Fisher for a softmax likelihood; label smoothing).

* **sweep**: the HBP sweep's steps, and the memory ledger's peak over them (``sweep.py``).

Each rule kind registers its decisions once, in ``_KINDS``.
"""
from dataclasses import dataclass, replace
from math import prod

import networkx as nx

from hbpc import ir
from hbpc.kinds import handler
from hbpc.rules.spec import Bilinear, Elementwise, Normalization, Selection, Structured

from .sweep import Sweep, sandwich_temporaries, schedule, take_temporaries

QUANTITIES = ("gradient", "ggn", "hessian", "kronecker")  # hessian: Hessian products and hessian/pch-* blocks
ALL = frozenset(QUANTITIES)
CURVATURE = ALL - {"gradient"}
MEMORY_LIMIT = 2 * 1024**3  # bytes: the generated modules' default memory_limit
FACTORED_MAPS = ("matmul", "shared matmul", "convolution")  # input maps whose weight block the KFAC family factors


@dataclass(frozen=True)
class BlockPlan:
    """The HBP block of one parameter at one node: its representation and the entries blocks() keeps for it."""

    parameter: str  # as in model.named_parameters()
    role: str
    representation: str  # "kronecker", "dense" or "matrix-free"
    entries: int
    factor: tuple = ()  # Kronecker: (b, gram), B's size and whether blocks() keeps its root R (N × b) instead


@dataclass(frozen=True)
class NodePlan:
    name: str
    input_needs_grad: tuple  # per input: does a parameter lie upstream of it?
    caches_input_view: bool
    kind: str = ""  # the derived classification: matmul, convolution, ..., elementwise, selection, normalization
    caches: tuple = ()  # ((cached tensor, frozenset of the quantities that read it), ...)
    blocks: tuple = ()  # BlockPlan per parameter role
    kronecker: bool = False  # a KFAC-family layer (kronecker_factors)
    lowering: bool = False  # torch's convolution kernels compute the derived maps
    weight_sandwich: bool = False  # S_x = Wᵀ S W: the input Jacobian is the weight itself
    curvature_temporaries: tuple = ()  # per input: entries its curvature step allocates besides S and S_x

    def block(self, role):
        return next(b for b in self.blocks if b.role == role)

    def keeps(self, item) -> bool:
        """Whether forward_backward caches ``item`` (a requested quantity reads it)."""
        return any(name == item for name, _ in self.caches)


@dataclass(frozen=True)
class LossPlan:
    rule: str
    reduction: str
    sampled_fisher: bool  # a softmax likelihood: labels can be sampled (MC-Fisher, KFAC)
    probability_targets: bool  # cross-entropy also takes class probabilities (its Hessian ignores t)
    label_smoothing: float
    caches: tuple = ()

    def keeps(self, item) -> bool:
        return any(name == item for name, _ in self.caches)

    @property
    def curvature(self) -> str:
        smoothing = f", label smoothing {self.label_smoothing}" if self.label_smoothing else ""
        return "exact Hessian" + (" + MC-Fisher" if self.sampled_fisher else "") + smoothing


@dataclass(frozen=True)
class Plan:
    nodes: tuple
    upstream: frozenset  # tensors (node names) with a parameter upstream, inclusive
    loss: LossPlan = None
    memory_limit: int = MEMORY_LIMIT
    batch: int = 1  # the batch size block entries are counted at
    element_size: int = 4
    quantities: frozenset = ALL  # what the generated module computes; caches serve only these
    sweep: Sweep = None  # the HBP sweep's steps and the memory they hold

    def node(self, name) -> NodePlan:
        return next(p for p in self.nodes if p.name == name)

    def renamed(self, stems):
        """The plan with every node renamed (``stems``: {name: new name})."""
        return replace(self, nodes=tuple(replace(p, name=stems[p.name]) for p in self.nodes),
                       upstream=frozenset(stems[name] for name in self.upstream), sweep=self.sweep.renamed(stems))

    def caches_for(self, quantities) -> dict:
        """{node: (cached tensors)} that the given quantities read (the loss under the key "loss")."""
        wanted = requested(quantities)
        entries = [(p.name, p.caches) for p in self.nodes] + [("loss", self.loss.caches if self.loss else ())]
        found = {name: tuple(item for item, readers in caches if readers & wanted) for name, caches in entries}
        return {name: items for name, items in found.items() if items}


def requested(quantities) -> frozenset:
    """The quantities (names, or one comma-separated string) as a set of QUANTITIES (None: all); ValueError
    naming an unknown one."""
    if isinstance(quantities, str):
        quantities = [q.strip() for q in quantities.split(",") if q.strip()]
    wanted = ALL if quantities is None else frozenset(quantities)
    unknown = wanted - ALL
    if unknown or not wanted:
        raise ValueError(f"unknown quantities {sorted(unknown)}; choose from {QUANTITIES}" if unknown
                         else f"no quantity requested; choose from {QUANTITIES}")
    return wanted


def _serving(caches, quantities) -> tuple:
    """The caches some requested quantity reads, each with the requested quantities that read it."""
    return tuple((item, readers & quantities) for item, readers in caches if readers & quantities)


def upstream_of_params(graph: nx.DiGraph) -> frozenset:
    found = set()
    for node in ir.nodes(graph):
        if node.params or any(source in found for source in graph.predecessors(node.name)):
            found.add(node.name)
    return frozenset(found)


def _uses(graph) -> dict:
    """{parameter: number of nodes using it}."""
    count = {}
    for name in graph.graph["order"]:
        for param in ir.node(graph, name).params.values():
            count[param] = count.get(param, 0) + 1
    return count


def _elementwise(node, context) -> dict:
    caches = [("d1", ALL)]
    residual = node.derived.residual
    if residual is not None:  # the residual r = g ⊙ φ″, formed on first use from g and what φ″ reads
        caches += [(s, frozenset({"hessian"})) for s in ("g", *sorted(residual.reads))]
    return dict(kind=node.derived.kind, caches=tuple(caches), curvature_temporaries=(0,))  # S_x in E[φ′ φ′ᵀ]'s place


def _selection_temporaries(node) -> tuple:
    """Entries each input's curvature step allocates besides S and its result."""
    d_y = prod(node.y_shape)
    primitive = node.rule.primitive
    if primitive in ("reshape", "identity", "add", "mask"):  # J = I or diag(keep): S_x = S or S ⊙ keep keepᵀ
        return (0,) * len(node.inputs)
    if primitive == "take":
        return (take_temporaries(prod(node.x_shape), d_y),)
    return tuple(sandwich_temporaries(prod(shape), d_y) for shape in node.x_shapes)  # pad, crop, cat


def _selection(node, context) -> dict:
    return dict(kind=node.derived.kind, caches=(("idx", ALL),) if node.rule.primitive == "take" else (),
                curvature_temporaries=_selection_temporaries(node))


def _normalization(node, context) -> dict:
    if not context["upstream"]:
        return dict(kind="normalization")
    reads = tuple((s, ALL) for s in node.derived.reads)
    return dict(kind="normalization", caches=reads + (("g", frozenset({"hessian"})),),
                curvature_temporaries=(sandwich_temporaries(prod(node.x_shape), prod(node.y_shape)),))


def _kronecker_sizes(block, view):
    """(a, b) with θ viewed as (a, b) and its block A ⊗ B, A (a × a) from S, B (b × b) from the samples."""
    a = prod(view[:block.split])
    return a, prod(view) // a


def _bilinear(node, context) -> dict:
    """Both operands serve every quantity (each Jacobian reads the other), g the cross residual."""
    if not context["upstream"]:
        return dict(kind="bilinear")
    d_y = prod(node.y_shape)  # E[J] and S E[J] per input (N J_n without averaging: counted at N = 1)
    return dict(kind="bilinear", caches=(("A", ALL), ("B", ALL), ("g", frozenset({"hessian"}))),
                curvature_temporaries=tuple(2 * d_y * prod(shape) for shape in node.x_shapes))


def _block_entries(block, view, batch) -> int:
    """Entries blocks() keeps for a derived block: A and B (or B's root, N × b, for a Gram factor), or θ²."""
    if block.kind == "dense":
        return prod(view) ** 2
    a, b = _kronecker_sizes(block, view)
    return a * a + (min(batch, b) * b if block.gram else b * b)


def _representation(block, entries, context) -> str:
    if block.kind == "operator" or entries * context["element_size"] > context["memory_limit"]:
        return "matrix-free"
    return block.kind


def _structured(node, context) -> dict:
    derived = node.derived
    kind, views = derived.kind, derived.views
    blocks = []
    for role, param in node.params.items():
        block, view = derived.tensors[role].block, views[{"weight": "W", "bias": "b"}[role]]
        entries = 0 if block.kind == "operator" else _block_entries(block, view, context["batch"])
        representation = _representation(block, entries, context)
        factor = (_kronecker_sizes(block, view)[1], block.gram) if representation == "kronecker" else ()
        blocks.append(BlockPlan(param, role, representation, entries if representation != "matrix-free" else 0, factor))
    params = node.params
    kronecker = (kind in FACTORED_MAPS and "weight" in params and node.hyper.get("groups", 1) == 1
                 and all(context["uses"][p] == 1 for p in params.values()))
    lowering = (kind in ("convolution", "transposed convolution") and "weight" in params
                and prod(views["X"]) > prod(node.x_shape))  # 1×1 kernels: the patches are the input
    caches = (("X", ALL), ("g", frozenset({"hessian"}))) if params else ()
    # S_x = Jᵀ S J: two gemms with W where the derived input map is W v on the flat input, else vjp passes
    weight_sandwich = kind == "matmul" and node.rule.input_view == "reshape" and len(views["X"]) == len(views["Y"]) == 1
    d_x, d_y = prod(node.x_shape), prod(node.y_shape)
    temporaries = d_y * d_x if weight_sandwich else sandwich_temporaries(d_x, d_y)  # Wᵀ S, or the chunked sandwich
    return dict(kind=kind, caches=caches, blocks=tuple(blocks), kronecker=kronecker, lowering=lowering,
                weight_sandwich=weight_sandwich, curvature_temporaries=(temporaries,))


# Each rule kind's decisions, registered once: (node, context) -> NodePlan fields.
_KINDS = {Elementwise: _elementwise, Selection: _selection, Normalization: _normalization, Structured: _structured,
          Bilinear: _bilinear}


def _loss_plan(graph) -> LossPlan:
    rule = graph.graph["loss_rule"]
    intermediates = graph.graph["loss_derived"].intermediates
    sampled = "softmax" in intermediates
    caches = (*((name, ALL) for name in intermediates), ("z, t, scale", CURVATURE))
    tokens = graph.graph.get("tokens")  # cross-entropy over positions: labels only (probabilities are not taken)
    return LossPlan(rule.key, graph.graph["reduction"], sampled, rule.target == "class" and sampled
                    and rule.key == "cross_entropy" and not tokens, graph.graph["loss_hyper"].get("label_smoothing", 0.0),
                    caches)


def plan(graph: nx.DiGraph, memory_limit=MEMORY_LIMIT, batch=1, element_size=4, quantities=None) -> Plan:
    """Every decision for the graph (annotated by ``hbpc.derive.annotate``); blocks are counted at ``batch`` samples
    of ``element_size`` bytes; ``forward_backward`` caches only what ``quantities`` (default: all) read."""
    quantities = requested(quantities)
    if "loss_derived" not in graph.graph:
        raise ValueError("the graph has no derivations: call hbpc.derive.annotate(graph) before planning")
    upstream = upstream_of_params(graph)
    uses = _uses(graph)
    nodes = []
    for name in graph.graph["order"]:
        node = ir.node(graph, name)
        needs_grad = tuple(i in upstream for i in node.inputs)
        context = dict(upstream=any(needs_grad), uses=uses, batch=batch, element_size=element_size,
                       memory_limit=memory_limit)
        decided = handler(_KINDS, node.rule, "plan")(node, context)
        decided["caches"] = _serving(decided.get("caches", ()), quantities)
        nodes.append(NodePlan(name, needs_grad, bool(node.params), **decided))
    loss = _loss_plan(graph)
    loss = replace(loss, caches=_serving(loss.caches, quantities))
    sweep = schedule(graph, {entry.name: entry for entry in nodes}, upstream)
    return Plan(tuple(nodes), upstream, loss, memory_limit, batch, element_size, quantities, sweep)


def table(graph, the_plan: Plan) -> str:
    """The plan as text: a row per node (parameters named as in model.named_parameters()), then the loss."""
    rows = [("node", "op", "kind", "parameters", "cached", "block", "bytes", "kfac")]
    for entry in the_plan.nodes:
        node = ir.node(graph, entry.name)
        blocks = {b.parameter: b for b in entry.blocks}
        params = list(node.params.values()) or ["-"]
        cached = ", ".join(item for item, readers in entry.caches) or "-"
        for k, param in enumerate(params):
            block = blocks.get(param)
            kind = entry.kind + (" (torch kernels)" if entry.lowering else "")
            rows.append((entry.name if k == 0 else "", node.op if k == 0 else "", kind if k == 0 else "",
                         param, cached if k == 0 else "", block.representation if block else "-",
                         str(block.entries * the_plan.element_size) if block else "-",
                         ("yes" if entry.kronecker else "no") if block else ""))
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    sweep, loss = the_plan.sweep, the_plan.loss
    lines.append(f"compiled for: {', '.join(q for q in QUANTITIES if q in the_plan.quantities)}; the HBP sweep holds "
                 f"at most {sweep.peak * the_plan.element_size} bytes of S matrices and temporaries"
                 + (f" (at the inputs of {sweep.peak_at})" if sweep.peak_at else ""))
    lines.append(f"loss: {loss.rule} ({loss.reduction}): {loss.curvature}; cached: "
                 + ", ".join(item for item, _ in loss.caches))
    lines.append(f"bytes at N = {the_plan.batch}, {the_plan.element_size} bytes an entry; memory_limit "
                 f"{the_plan.memory_limit / 2**30:.2f} GiB; cached tensors serve: d1, X, idx and statistics every "
                 "quantity, r and g the Hessian and pch-* curvatures")
    return "\n".join(lines)
