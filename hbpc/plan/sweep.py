"""The HBP sweep as a schedule of steps, and the memory ledger that counts what each step holds.

HBP walks the graph backwards keeping S for every pair of tensors on the frontier (``S_a`` for one tensor,
``S_a__b`` for the cross curvature of a and b, a before b in graph order). ``schedule`` lists its steps; the
emitter prints one line per step and decides nothing. The ledger counts, per step, the live S variables, the S
that blocks() keeps and the step's temporaries; ``Sweep.peak`` is the most at any step (blocks() refuses from it
before allocating anything).
"""
from dataclasses import dataclass, replace
from math import prod

from hbpc import ir

CHUNK_ENTRIES = 2**22  # the chunk_entries default of hbpc.runtime's chunked helpers


def sandwich_temporaries(d_x, d_y) -> int:
    """Entries ``sandwich_independent`` holds besides S and S_x: S J, and a chunk of rows in and out (at most
    chunk_entries, at least one row) with as much again for the vjp's workspace."""
    return d_y * d_x + 4 * max(d_x + d_y, min(CHUNK_ENTRIES, max(d_x, d_y) * (d_x + d_y)))


def take_temporaries(d_x, d_y) -> int:
    """Entries ``take_input_curvature`` holds besides S and S_x: E[P] and E[P]ᵀ S (average), or a chunk of samples'
    d_y² entries (at least one sample, at most chunk_entries or S_x's size) as values and two int64 index tensors."""
    return max(2 * d_y * d_x, 5 * max(d_y * d_y, min(CHUNK_ENTRIES, d_x * d_x)))


@dataclass(frozen=True)
class Step:
    """One step of the sweep at ``node``. ``kind``:

    * ``visit``: blocks() builds the node's blocks from S at its output;
    * ``at``: S = S at the node's output, to propagate to its inputs;
    * ``input``: ``target`` (+)= S at input ``slots[0]`` (E[J]ᵀ S E[J] or E[Jᵀ S J], plus the residual);
    * ``cross``: ``target`` (+)= E[J_i]ᵀ S E[J_j] for ``slots`` (i, j);
    * ``frontier``: ``target`` (+)= E[J_i]ᵀ M for ``slots[0]``, M the cross curvature ``matrix`` (transposed
      where ``flip``) of the node and another frontier tensor;
    * ``free``: ``del`` the ``variables``.

    Variables are tuples of node names: (a,) for S_a, (a, b) for S_a__b. ``accumulate``: target = target + term;
    ``transpose``: the term is (term)ᵀ; ``symmetric``: term + termᵀ.
    """

    kind: str
    node: str
    target: tuple = ()
    slots: tuple = ()
    matrix: tuple = ()
    flip: bool = False
    accumulate: bool = False
    transpose: bool = False
    symmetric: bool = False
    variables: tuple = ()

    def renamed(self, stems):
        def names(variable):
            return tuple(stems[name] for name in variable)

        return replace(self, node=stems[self.node], target=names(self.target), matrix=names(self.matrix),
                       variables=tuple(map(names, self.variables)))


@dataclass(frozen=True)
class Sweep:
    steps: tuple
    peak: int  # entries held at most (S variables, kept S, temporaries)
    peak_at: str  # the node whose inputs' step peaks ("" for the loss)
    factors: tuple  # (b, gram) per Kronecker block blocks() keeps: B (b × b) or, when gram, its root (N × b)

    def renamed(self, stems):
        return replace(self, steps=tuple(step.renamed(stems) for step in self.steps),
                       peak_at=stems.get(self.peak_at, self.peak_at))


class _Ledger:
    """Entries the sweep holds at once: live S variables, the S that blocks keep, each step's temporaries."""

    def __init__(self, sizes, last):
        self.sizes, self.live, self.kept = sizes, {(last,): sizes[last] ** 2}, 0
        self.peak, self.where = self.live[(last,)], ""

    def entries(self, variable):
        return prod(self.sizes[name] for name in (variable * 2 if len(variable) == 1 else variable))

    def form(self, variable, temporaries, where):
        """variable is formed (or re-formed as variable + term, holding both sums and the term at once)."""
        entries = self.entries(variable)
        total = self.kept + sum(self.live.values()) + entries * (2 if variable in self.live else 1) + temporaries
        if total > self.peak:
            self.peak, self.where = total, where
        self.live[variable] = entries

    def keep(self, variable):
        """Blocks built from variable hold it (or factors of its size) until blocks() returns."""
        self.kept += self.live.pop(variable)

    def free(self, variables):
        for variable in variables:
            self.live.pop(variable, None)


def schedule(graph, entries: dict, upstream) -> Sweep:
    """The sweep over the graph for the node plans ``entries`` ({name: NodePlan}), counted by the ledger."""
    order = graph.graph["order"]
    position = {name: k for k, name in enumerate(order)}
    ledger = _Ledger({name: prod(ir.node(graph, name).y_shape) for name in order}, order[-1])
    steps, defined, frontier = [], {(order[-1],)}, [order[-1]]

    def pair(a, b):
        """The cross-curvature variable of a and b, and whether the term must be transposed into it."""
        first, second = sorted((a, b), key=position.__getitem__)
        return (first, second), first != a

    def form(kind, name, target, temporaries, **fields):
        steps.append(Step(kind, name, target, accumulate=target in defined, **fields))
        defined.add(target)
        ledger.form(target, temporaries, name)

    for name in reversed(order):
        if name not in upstream:
            continue
        node, entry = ir.node(graph, name), entries[name]
        frontier.remove(name)
        if entry.blocks:
            steps.append(Step("visit", name))
            ledger.keep((name,))
        active = [(i, source) for i, source in enumerate(node.inputs) if source in upstream]
        if not active:
            continue
        steps.append(Step("at", name))
        for i, source in active:
            form("input", name, (source,), entry.curvature_temporaries[i], slots=(i,))
        for (i, a), (j, b) in ((p, q) for k, p in enumerate(active) for q in active[k + 1:]):
            target, flip = ((a,), False) if a == b else pair(a, b)
            form("cross", name, target, 2 * ledger.entries(target), slots=(i, j), symmetric=a == b, transpose=flip)
        for other in frontier:
            matrix, flip = pair(name, other)
            if matrix not in defined:
                continue
            for i, source in active:
                target, transpose = ((other,), False) if source == other else pair(source, other)
                form("frontier", name, target, 2 * ledger.entries(target), slots=(i,), matrix=matrix, flip=flip,
                     symmetric=source == other, transpose=transpose)
        frontier += [source for source in dict.fromkeys(s for _, s in active) if source not in frontier]
        dead = [(name,)] + [pair(name, other)[0] for other in frontier if other != name]
        steps.append(Step("free", name, variables=tuple(v for v in dead if v in defined)))
        defined -= set(dead)
        ledger.free(dead)
    factors = tuple(block.factor for name in order for block in entries[name].blocks
                    if block.representation == "kronecker")
    return Sweep(tuple(steps), ledger.peak, ledger.where, factors)
