"""Stage 3 on its own: every plan decision is data, tested without generating code (except where the emitted
module is checked to follow a decision)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hbpc.derive import annotate
from hbpc.emit import emit
from hbpc.export import export
from hbpc.plan import plan

ROOT = Path(__file__).resolve().parent.parent
F64 = dict(dtype=torch.float64)


def _graph(model, input_shape, loss_fn=None):
    return annotate(export(model.double(), torch.randn(2, *input_shape, **F64), loss_fn or nn.CrossEntropyLoss()))


def _mlp():
    return nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 3))


def test_block_representation_follows_the_derivation_and_the_memory_limit():
    graph = _graph(_mlp(), (6,))
    blocks = {b.parameter: b for p in plan(graph, element_size=8).nodes for b in p.blocks}
    assert blocks["0.weight"].representation == "kronecker"  # A (5×5) ⊗ B, B = x xᵀ: a Gram factor, root N × 6
    assert blocks["0.weight"].entries == 5 * 5 + 1 * 6  # at N = 1: A and B's root
    assert blocks["0.bias"].representation == "dense" and blocks["0.bias"].entries == 25
    limited = {b.parameter: b for p in plan(graph, memory_limit=31 * 8, element_size=8).nodes for b in p.blocks}
    assert limited["0.weight"].representation == "kronecker" and limited["0.bias"].representation == "dense"
    tight = {b.parameter: b for p in plan(graph, memory_limit=24 * 8, element_size=8).nodes for b in p.blocks}
    assert tight["0.weight"].representation == "matrix-free" and tight["0.weight"].entries == 0
    assert tight["0.bias"].representation == "matrix-free" and tight["2.bias"].representation == "dense"  # 9 entries


def test_emitted_blocks_follow_the_planned_representation():
    """A block the plan makes matrix-free is emitted as an OperatorBlock, and it is still the exact block."""
    from hbpc.compiler import verified_module

    torch.manual_seed(0)
    model, x = _mlp().double(), torch.randn(1, 6, **F64)
    graph = annotate(export(model, x, nn.CrossEntropyLoss()))
    text = emit(graph, plan(graph, memory_limit=24 * 8, element_size=8), "mlp", "0")
    module = verified_module(graph, text, model, x, nn.CrossEntropyLoss())
    curvature = module.Curvature(model)
    curvature.forward_backward(x, torch.tensor([1]))
    blocks = curvature.blocks("ggn")
    assert type(blocks["0.weight"]).__name__ == "OperatorBlock" and type(blocks["2.bias"]).__name__ == "DenseBlock"
    v = torch.randn(5, 6, **F64)
    exact = curvature.block_products("ggn")["0.weight"](v)  # at N = 1 HBP's block is the exact GGN block
    assert torch.allclose(blocks["0.weight"] @ v, exact, rtol=1e-10, atol=1e-12)


def test_cache_set_per_requested_quantity():
    graph = _graph(nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)), (6,))
    decided = plan(graph)
    gradient = decided.caches_for({"gradient"})
    assert gradient["linear0"] == ("X",) and gradient["sigmoid1"] == ("d1",) and gradient["relu3"] == ("d1",)
    hessian = decided.caches_for({"hessian"})
    assert hessian["linear0"] == ("X", "g") and hessian["sigmoid1"] == ("d1", "g", "y")
    assert hessian["relu3"] == ("d1",)  # ReLU: φ″ = 0 almost everywhere, no residual to keep
    assert "z, t, scale" in hessian["loss"] and "z, t, scale" not in gradient["loss"]
    with pytest.raises(ValueError, match="unknown quantities"):
        decided.caches_for({"fisher"})


def test_compiling_for_fewer_quantities_keeps_only_their_caches():
    graph = _graph(nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 3)), (6,))
    ggn = plan(graph, quantities=("gradient", "ggn"))
    assert ggn.quantities == {"gradient", "ggn"}
    assert [entry.caches for entry in ggn.nodes][:2] == [(("X", {"gradient", "ggn"}),), (("d1", {"gradient", "ggn"}),)]
    assert not ggn.node("linear0").keeps("g") and ggn.loss.keeps("z, t, scale")
    gradient = plan(graph, quantities="gradient")
    assert not gradient.loss.keeps("z, t, scale") and gradient.node("sigmoid1").keeps("d1")
    assert plan(graph).node("sigmoid1").keeps("y") and not ggn.node("sigmoid1").keeps("y")
    with pytest.raises(ValueError, match="unknown quantities"):
        plan(graph, quantities=("gradient", "fisher"))


def test_a_module_compiled_for_the_gradient_and_the_ggn_is_exact_there_and_refuses_the_hessian():
    from hbpc.compiler import compile_model, compile_source
    from exactness import _reference_products

    torch.manual_seed(0)
    model, x, target = _mlp().double(), torch.randn(4, 6, **F64), torch.tensor([0, 2, 1, 0])
    module = compile_model(model, x, nn.CrossEntropyLoss(), quantities=("gradient", "ggn"))
    curvature = module.Curvature(model)
    assert curvature.QUANTITIES == ("gradient", "ggn")
    curvature.forward_backward(x, target)
    assert not hasattr(curvature, "linear0_g") and not hasattr(curvature, "sigmoid1_y")  # the Hessian's caches
    vs = [torch.randn(p.shape, **F64) for p in model.parameters()]
    _, grads, _, ggn = _reference_products(model, nn.CrossEntropyLoss(), x, target, vs)
    for p, g in zip(model.parameters(), grads):
        assert torch.allclose(p.grad, g, rtol=1e-10, atol=1e-12)
    for found, expected in zip(curvature.ggn_vector_product(vs), ggn):
        assert torch.allclose(found, expected, rtol=1e-10, atol=1e-12)
    assert set(curvature.blocks("ggn")) == {name for name, _ in model.named_parameters()}
    for call in (lambda: curvature.hessian_vector_product(vs), lambda: curvature.blocks("hessian"),
                 lambda: curvature.block_products("pch-abs"), lambda: curvature.kronecker_factors("kflr")):
        with pytest.raises(ValueError, match=r"compiled for gradient, ggn only; recompile with quantities="):
            call()
    text = compile_source(model, x, nn.CrossEntropyLoss(), quantities="gradient,ggn")
    assert "self.linear0_g" not in text and "self.linear0_X" in text and "QUANTITIES = ('gradient', 'ggn')" in text


def test_the_residual_is_formed_on_first_use_only():
    """forward_backward keeps g (and what φ″ reads); r = g ⊙ φ″ is formed by the first Hessian product, once."""
    from hbpc.compiler import verified_module

    torch.manual_seed(0)
    model, x, target = _mlp().double(), torch.randn(4, 6, **F64), torch.tensor([0, 2, 1, 0])
    graph = annotate(export(model, x, nn.CrossEntropyLoss()))
    module = verified_module(graph, emit(graph, plan(graph), "mlp", "0"), model, x, nn.CrossEntropyLoss())
    curvature = module.Curvature(model)
    loss = curvature.forward_backward(x, target)
    assert curvature.sigmoid1_r is None
    curvature.blocks("ggn")
    assert curvature.sigmoid1_r is None  # the GGN has no residual
    curvature.blocks("hessian")
    r = curvature.sigmoid1_r
    s = torch.sigmoid(model[0](x))  # r = g ⊙ φ″ with φ″ = s (1 - s)(1 - 2 s) and g = ∂L/∂s
    g = torch.autograd.grad(nn.CrossEntropyLoss()(model[2](s), target), s)[0]
    assert torch.allclose(r, g * s * (1 - s) * (1 - 2 * s), rtol=1e-12, atol=1e-14)
    curvature.blocks("pch-abs")
    assert curvature.sigmoid1_r is r  # formed once per forward_backward
    assert torch.isclose(loss, nn.CrossEntropyLoss()(model(x), target))


def test_kfac_eligibility_comes_from_the_derived_classification():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    cases = [
        (nn.Sequential(nn.Linear(4, 3)), (4,), {0: ("matmul", True)}),
        (nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(16, 3)), (2, 4, 4),
         {0: ("convolution", True), 2: ("matmul", True)}),
        (nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 3)), (2, 4, 4),
         {0: ("convolution", False)}),  # two groups: no single G ⊗ A
        (nn.Sequential(nn.ConvTranspose2d(2, 1, 2), nn.Flatten(), nn.Linear(25, 3)), (2, 4, 4),
         {0: ("transposed convolution", False)}),
        (Tied(), (4,), {0: ("matmul", False)}),  # a parameter used twice has no factors of its own
    ]
    for model, shape, expected in cases:
        decided = plan(_graph(model, shape))
        for position, (kind, kronecker) in expected.items():
            entry = decided.nodes[position]
            assert (entry.kind, entry.kronecker) == (kind, kronecker), (model, entry.name)


def test_convolution_lowering_needs_patches_larger_than_the_input():
    decided = plan(_graph(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(8, 3)),
                          (2, 4, 4)))
    assert [p.lowering for p in decided.nodes[:2]] == [True, False]  # a 1×1 kernel's patches are its input


def test_loss_curvature():
    mlp = _mlp()
    assert plan(_graph(mlp, (6,))).loss.curvature == "exact Hessian + MC-Fisher"
    smoothed = plan(_graph(mlp, (6,), nn.CrossEntropyLoss(label_smoothing=0.1))).loss
    assert smoothed.label_smoothing == 0.1 and smoothed.probability_targets
    mse = plan(_graph(mlp, (6,), nn.MSELoss())).loss
    assert mse.curvature == "exact Hessian" and not mse.sampled_fisher and not mse.probability_targets


def test_plan_command_prints_a_row_per_node_with_parameter_names():
    run = subprocess.run([sys.executable, "-m", "hbpc.cli", "plan", str(ROOT / "examples/models/mlp_fashion_mnist.py")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["node", "op", "kind", "parameters", "cached", "block", "bytes", "kfac"]
    assert any("1.weight" in line and "kronecker" in line for line in lines)
    assert lines[-2].startswith("loss: cross_entropy (mean): exact Hessian + MC-Fisher")


def test_hbpc_compile_for_names_an_unknown_quantity(tmp_path, capsys):
    from hbpc.cli import main

    out = tmp_path / "curv.py"
    assert main(["compile", str(ROOT / "examples" / "models" / "logreg_fashion_mnist.py"), "-o", str(out),
                 "--for", "gradient,fisher", "--no-verify"]) == 2
    assert "unknown quantities ['fisher']" in capsys.readouterr().err and not out.exists()


def test_the_plan_schedules_the_hbp_sweep_and_counts_its_peak():
    """Sizes 5, 5, 3: at linear2 blocks keep S (3²) while S_sigmoid1 (5²) forms with Wᵀ S (3 × 5): 49 entries; at
    sigmoid1 S_linear0 (5²) forms beside S_sigmoid1 in place of E[φ′ φ′ᵀ]: 9 + 25 + 25 = 59, the peak."""
    graph = _graph(_mlp(), (6,))
    sweep = plan(graph).sweep
    assert [(step.kind, step.node) for step in sweep.steps] == [
        ("visit", "linear2"), ("at", "linear2"), ("input", "linear2"), ("free", "linear2"),
        ("at", "sigmoid1"), ("input", "sigmoid1"), ("free", "sigmoid1"), ("visit", "linear0")]
    assert (sweep.peak, sweep.peak_at) == (59, "sigmoid1")
    assert sweep.factors == ((6, True), (5, True))  # the weights' B = x xᵀ kept as roots (N × 6, N × 5)
    text = emit(graph, plan(graph), "mlp", "0")
    assert "MEMORY = (59, 'the inputs of sigmoid1', ((6, True), (5, True)))" in text


def test_plan_command_for_fewer_quantities_drops_their_caches():
    run = subprocess.run([sys.executable, "-m", "hbpc.cli", "plan", str(ROOT / "examples/models/mlp_fashion_mnist.py"),
                          "--for", "gradient,ggn"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    rows = {line.split()[0]: line.split() for line in run.stdout.splitlines()[1:] if line[:1].strip()}
    assert rows["linear1"][4] == "X" and rows["sigmoid2"][4] == "d1"  # no g, no y: the Hessian's
    assert "compiled for: gradient, ggn;" in run.stdout
