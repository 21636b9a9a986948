"""Stage 3: decide what the generated code computes and caches, from shapes alone.

* A tensor needs a gradient, a tangent and a curvature only if some parameter lies upstream of it
  (the first layer's input curvature is never formed).
* A node with parameters caches its input view ``X`` for parameter gradients and blocks.
* HBP blocks walk the graph backwards keeping a *frontier*: the tensors whose consumers are
  all processed. ``S`` is stored per pair of frontier tensors; ``hbp_entries`` is the largest
  frontier's total size squared, so the generated code can refuse before allocating.
"""
from dataclasses import dataclass
from math import prod

import networkx as nx


@dataclass(frozen=True)
class NodePlan:
    name: str
    input_needs_grad: tuple  # per input: does a parameter lie upstream of it?
    caches_input_view: bool


@dataclass(frozen=True)
class Plan:
    nodes: tuple
    upstream: frozenset       # tensors (node names) with a parameter upstream, inclusive
    hbp_entries: int
    hbp_largest: str


def upstream_of_params(graph: nx.DiGraph) -> frozenset:
    found = set()
    for name in graph.graph["order"]:
        node = graph.nodes[name]
        if node["params"] or any(i in found for i in node["inputs"]):
            found.add(name)
    return frozenset(found)


def _frontier_peak(graph, upstream):
    order = graph.graph["order"]
    size = {name: prod(graph.nodes[name]["y_shape"]) for name in order}
    frontier, peak, where = {order[-1]}, size[order[-1]] ** 2, "the loss"
    for name in reversed(order):
        frontier.discard(name)
        frontier |= {i for i in graph.nodes[name]["inputs"] if i in upstream}
        total = sum(size[f] for f in frontier) ** 2
        if total > peak:
            peak, where = total, f"the inputs of {name}"
    return peak, where


def plan(graph: nx.DiGraph) -> Plan:
    upstream = upstream_of_params(graph)
    nodes = tuple(NodePlan(name, tuple(i in upstream for i in graph.nodes[name]["inputs"]),
                           bool(graph.nodes[name]["params"])) for name in graph.graph["order"])
    peak, where = _frontier_peak(graph, upstream)
    return Plan(nodes, upstream, peak, where)
