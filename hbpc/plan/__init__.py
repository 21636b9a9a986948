"""Stage 3: decide what the generated code computes and caches, from shapes alone.

* A node needs its input gradient and input curvature only if some node before it has parameters
  (the first layer's input curvature is never formed).
* A node with parameters caches its input view ``X`` for parameter gradients and blocks.
* ``hbp_entries`` is the largest per-sample curvature matrix ``S`` that ``blocks()`` forms,
  so the generated code can refuse before allocating.
"""
from dataclasses import dataclass
from math import prod

import networkx as nx


@dataclass(frozen=True)
class NodePlan:
    name: str
    needs_input_grad: bool
    caches_input_view: bool


@dataclass(frozen=True)
class Plan:
    nodes: tuple
    hbp_entries: int
    hbp_largest: str


def plan(graph: nx.DiGraph) -> Plan:
    order = graph.graph["order"]
    seen_params, plans = False, []
    entries, largest = prod(graph.nodes[order[-1]]["y_shape"]) ** 2, "the loss"
    for name in order:
        node = graph.nodes[name]
        plans.append(NodePlan(name, needs_input_grad=seen_params, caches_input_view=bool(node["params"])))
        if seen_params and prod(node["x_shape"]) ** 2 > entries:
            entries, largest = prod(node["x_shape"]) ** 2, name
        seen_params = seen_params or bool(node["params"])
    return Plan(tuple(plans), entries, largest)
