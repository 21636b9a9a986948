"""Stage boundaries: derive annotates the graph once; plan and emit read the annotations and never derive."""
import ast
from pathlib import Path

import torch
from torch import nn

import hbpc.derive
from hbpc.derive import annotate
from hbpc.emit import emit
from hbpc.export import export
from hbpc.plan import plan

ROOT = Path(__file__).resolve().parent.parent


def _imports(package) -> set:
    """Every module a package's files import (``from . import x`` as ``.x``)."""
    found = set()
    for path in (ROOT / "hbpc" / package).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                found.add("." * node.level + (node.module or ""))
    return found


def test_plan_and_emit_import_neither_derive_nor_sympy():
    for package in ("plan", "emit"):
        imported = _imports(package)
        assert not {m for m in imported if m.split(".")[0] == "sympy" or m.startswith("hbpc.derive")}, (package, imported)


def test_plan_and_emit_read_the_annotations_without_deriving(monkeypatch):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 3))
    graph = annotate(export(model, torch.randn(2, 1, 4, 4), nn.CrossEntropyLoss()))
    assert {type(graph.nodes[n]["derived"]).__name__ for n in graph.graph["order"]} >= {
        "StructuredAnnotation", "ElementwiseAnnotation", "NormalizationAnnotation", "SelectionAnnotation"}
    assert graph.nodes[graph.graph["order"][-1]]["derived"].kind == "matmul"
    assert graph.nodes[graph.graph["order"][0]]["derived"].kind == "convolution"

    def refuse(rule):
        raise AssertionError(f"derive({rule.key}) called after annotate")

    monkeypatch.setattr(hbpc.derive, "derive", refuse)
    monkeypatch.setattr("hbpc.derive.annotations.derive", refuse)
    text = emit(graph, plan(graph), "model", "0")
    assert "class Curvature" in text


def test_planning_an_unannotated_graph_names_the_missing_step():
    graph = export(nn.Sequential(nn.Linear(3, 2)), torch.randn(2, 3), nn.CrossEntropyLoss())
    try:
        plan(graph)
    except ValueError as error:
        assert "annotate" in str(error)
    else:
        raise AssertionError("plan accepted a graph without derivations")
