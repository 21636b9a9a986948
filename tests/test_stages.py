"""Stage boundaries: derive annotates the graph once; plan and emit read the annotations and never derive."""
import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import hbpc.derive
from hbpc import ir
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
    nodes = ir.nodes(graph)
    assert {type(node.derived).__name__ for node in nodes} >= {
        "StructuredAnnotation", "ElementwiseAnnotation", "NormalizationAnnotation", "SelectionAnnotation"}
    assert nodes[-1].derived.kind == "matmul" and nodes[0].derived.kind == "convolution"

    def refuse(rule):
        raise AssertionError(f"derive({rule.key}) called after annotate")

    monkeypatch.setattr(hbpc.derive, "derive", refuse)
    monkeypatch.setattr("hbpc.derive.annotations.derive", refuse)
    text = emit(graph, plan(graph), "model", "0")
    assert "class Curvature" in text


def test_planning_an_unannotated_graph_names_the_missing_step():
    graph = export(nn.Sequential(nn.Linear(3, 2)), torch.randn(2, 3), nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="annotate"):
        plan(graph)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 3), nn.Linear(3, 3)

    def forward(self, x):
        h = self.lin(x)
        return self.out(torch.tanh(h)) + h


def test_ir_nodes_are_typed_and_edges_carry_the_tensor_and_its_slot():
    graph = export(_Residual(), torch.randn(2, 4), nn.CrossEntropyLoss())
    lin, tanh, out, add = ir.nodes(graph)
    assert (lin.op, lin.inputs, lin.x_shape, lin.y_shape) == ("linear", (ir.INPUT,), (4,), (3,))
    assert lin.params == {"weight": "lin.weight", "bias": "lin.bias"} and lin.param_shapes["weight"] == (3, 4)
    assert add.inputs == (out.name, lin.name) and add.x_shapes == ((3,), (3,))
    assert graph.edges[lin.name, add.name]["tensor"] == ir.Tensor((3,), (1,))
    assert graph.edges[out.name, add.name]["tensor"] == ir.Tensor((3,), (0,))
    assert not graph.in_edges(lin.name)  # the model input is no node
    with pytest.raises(dataclasses.FrozenInstanceError):
        lin.op = "conv2d"
