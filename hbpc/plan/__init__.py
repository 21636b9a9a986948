"""Stage 3: decide what the generated code computes and caches, from shapes alone.

* A tensor needs a gradient, a tangent and a curvature only if some parameter lies upstream of it
  (the first layer's input curvature is never formed).
* A node with parameters caches its input view ``X`` for parameter gradients and blocks.
* HBP blocks walk the graph backwards keeping a *frontier*: the tensors whose consumers are
  all processed; the emitter counts what that sweep holds (``hbpc.emit.module._MemoryLedger``),
  so the generated code can refuse before allocating.
"""
from dataclasses import dataclass

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


def upstream_of_params(graph: nx.DiGraph) -> frozenset:
    found = set()
    for name in graph.graph["order"]:
        node = graph.nodes[name]
        if node["params"] or any(i in found for i in node["inputs"]):
            found.add(name)
    return frozenset(found)


def plan(graph: nx.DiGraph) -> Plan:
    upstream = upstream_of_params(graph)
    nodes = tuple(NodePlan(name, tuple(i in upstream for i in graph.nodes[name]["inputs"]),
                           bool(graph.nodes[name]["params"])) for name in graph.graph["order"])
    return Plan(nodes, upstream)
