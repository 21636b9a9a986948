"""``EigenBlock`` (kept eigendecompositions, block-relative damping) against dense float64 solves of compiled HBP
blocks, ``curvature_every`` reuse, and the ``KRONECKER`` preset on a small sigmoid MLP."""

import pytest
import torch
from torch import nn

import hbpc
from hbpc.optim import KRONECKER, NewtonCG
from hbpc.optim.solves import EigenBlock

DTYPE = torch.float64


def sigmoid_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 9), nn.Sigmoid(), nn.Linear(9, 7), nn.Sigmoid(), nn.Linear(7, 4)).to(DTYPE)


def batch(n: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=generator, dtype=DTYPE), torch.randint(0, 4, (n,), generator=generator)


@pytest.fixture(scope="module")
def compiled():
    model = sigmoid_mlp()
    return model, hbpc.compile_model(model, batch()[0], nn.CrossEntropyLoss())


def relative_reference(block, lam: float) -> torch.Tensor:
    """Dense ``A ⊗ B + D_λ``: ``(A + √λ a I) ⊗ (B + √λ b I)``, dense blocks ``B + λ tr(B)/n I``."""
    if block.kronecker_factors is None:
        B = block.to_dense()
        return B + lam * torch.trace(B) / B.shape[0] * torch.eye(B.shape[0], dtype=DTYPE)
    A, B = block.kronecker_factors
    m, n = A.shape[0], B.shape[0]
    return torch.kron(A + lam ** 0.5 * torch.trace(A) / m * torch.eye(m, dtype=DTYPE),
                      B + lam ** 0.5 * torch.trace(B) / n * torch.eye(n, dtype=DTYPE))


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("kind", ["ggn", "pch-abs"])
def test_eigen_block_solves_match_dense(compiled, kind, average):
    model, generated = compiled
    curv = generated.Curvature(model)
    curv.forward_backward(*batch())
    generator = torch.Generator().manual_seed(2)
    for name, block in curv.blocks(kind, True, average).items():
        eigen, dense = EigenBlock(block), block.to_dense()
        rhs = torch.randn(block.param_shape, generator=generator, dtype=DTYPE)
        exact = torch.linalg.solve(dense + 0.3 * torch.eye(dense.shape[0], dtype=DTYPE), rhs.reshape(-1))
        torch.testing.assert_close(eigen.solve(rhs, 0.3).reshape(-1), exact, rtol=1e-8, atol=1e-10, msg=name)
        relative = torch.linalg.solve(relative_reference(block, 0.05), rhs.reshape(-1))
        torch.testing.assert_close(eigen.solve_relative(rhs, 0.05).reshape(-1), relative, rtol=1e-7, atol=1e-10,
                                   msg=name)
        assert eigen.trace() == pytest.approx(torch.trace(dense).item(), rel=1e-10)


def test_curvature_every_reuses_the_blocks(compiled):
    model, generated = compiled
    model = sigmoid_mlp()
    curv = generated.Curvature(model)
    calls = []
    blocks = curv.blocks
    curv.blocks = lambda *args, **kwargs: calls.append(1) or blocks(*args, **kwargs)
    opt = NewtonCG(model.parameters(), curv, source="blocks", solver="direct", curvature_every=3)
    x, y = batch(8)
    for _ in range(7):
        opt.zero_grad()
        opt.step(lambda: curv.forward_backward(x, y))
    assert len(calls) == 3  # steps 1, 4, 7


@pytest.mark.parametrize("kwargs, message", [
    (dict(relative_damping=True), "relative_damping"),
    (dict(source="blocks", curvature_every=2), "curvature_every"),
    (dict(source="blocks", solver="direct", curvature_every=0), "curvature_every"),
])
def test_invalid_kronecker_options(compiled, kwargs, message):
    model, generated = compiled
    with pytest.raises(ValueError, match=message):
        NewtonCG(model.parameters(), generated.Curvature(model), **kwargs)


def test_kronecker_preset_decreases_the_loss(compiled):
    _, generated = compiled
    model = sigmoid_mlp()
    curv = generated.Curvature(model)
    opt = NewtonCG(model.parameters(), curv, **KRONECKER)
    x, y = batch(64, seed=3)
    first = float(curv.forward_backward(x, y))
    for _ in range(30):
        opt.zero_grad()
        loss = opt.step(lambda: curv.forward_backward(x, y))
    assert float(curv.forward_backward(x, y)) < 0.5 * first, (first, float(loss))


def test_time_to_target_resolves_presets():
    from bench.time_to_target import newton_options

    assert newton_options(dict(preset="KRONECKER", lr=4.0)) == {**KRONECKER, "lr": 4.0}
    assert newton_options(dict(lr=0.5)) == dict(lr=0.5)


# ---- the default source="auto" ------------------------------------------------------------------


def test_auto_solves_with_kronecker_blocks_given_a_closure_and_with_block_products_without(compiled):
    _, generated = compiled
    model = sigmoid_mlp()
    curv = generated.Curvature(model)
    opt = NewtonCG(model.parameters(), curv, source="auto", lr=2.0)
    x, y = batch(16)
    opt.zero_grad()
    opt.step(lambda: curv.forward_backward(x, y))
    assert opt.mode == "kronecker" and {s.reason for s in opt.last_stats.params.values()} == {"direct"}
    opt.zero_grad()
    curv.forward_backward(x, y)
    opt.step()
    assert opt.mode == "block products" and all(s.cg_iterations > 0 for s in opt.last_stats.params.values())


def test_auto_falls_back_to_block_products_for_good_when_blocks_refuse(compiled):
    _, generated = compiled
    model = sigmoid_mlp()
    curv = generated.Curvature(model)
    curv.memory_limit = 1  # blocks() raises MemoryError
    opt = NewtonCG(model.parameters(), curv, source="auto")
    x, y = batch(16)
    first = float(curv.forward_backward(x, y))
    for _ in range(5):
        opt.zero_grad()
        opt.step(lambda: curv.forward_backward(x, y))
        assert opt.mode == "block products" and list(opt.modes) == ["block products"]
    assert float(curv.forward_backward(x, y)) < first


@pytest.mark.parametrize("kwargs", [dict(solver="cg"), dict(preconditioner="diagonal"), dict(split=2),
                                    dict(max_backtracks=None), dict(line_search=False)])
def test_options_the_kronecker_mode_cannot_use_leave_block_products(compiled, kwargs):
    model, generated = compiled
    opt = NewtonCG(model.parameters(), generated.Curvature(model), source="auto", **kwargs)
    assert list(opt.modes) == ["block products"] and opt.source == "block_products"


def test_explicit_options_apply_to_both_modes(compiled):
    model, generated = compiled
    opt = NewtonCG(model.parameters(), generated.Curvature(model), source="auto", curvature="ggn", curvature_every=1)
    assert [mode["curvature"] for mode in opt.modes.values()] == ["ggn", "ggn"]
    assert opt.modes["kronecker"]["curvature_every"] == 1 and opt.modes["kronecker"]["solver"] == "direct"


def test_eigen_block_reads_the_step_curvature_from_its_solve_and_shares_eigendecompositions(compiled):
    """``quadratic`` along a multiple of the latest answer equals ``vᵀ B v`` by a product; a bias block (the weight's
    output factor) costs no second eigendecomposition."""
    model, generated = compiled
    curv = generated.Curvature(model)
    curv.forward_backward(*batch(8))
    generator = torch.Generator().manual_seed(4)
    shared = {}
    blocks = {name: EigenBlock(block, shared) for name, block in curv.blocks("pch-abs", True, False).items()}
    for name, eigen in blocks.items():
        rhs = torch.randn(eigen.param_shape, generator=generator, dtype=DTYPE)
        for solve in (eigen.solve, eigen.solve_relative):
            v = -2.5 * solve(rhs, 0.1)
            assert eigen.quadratic(v) == pytest.approx(torch.dot(v.reshape(-1), (eigen.block @ v).reshape(-1)).item(),
                                                       rel=1e-8), name
        other = torch.randn(eigen.param_shape, generator=generator, dtype=DTYPE)  # not parallel: a product
        assert eigen.quadratic(other) == pytest.approx(torch.dot(other.reshape(-1), (eigen.block @ other).reshape(-1))
                                                       .item(), rel=1e-10)
    factors = 2 * sum(block.kronecker_factors is not None and not hasattr(block.block, "R") for block in blocks.values())
    grams = sum(hasattr(block.block, "R") for block in blocks.values())
    dense = sum(block.kronecker_factors is None for block in blocks.values())
    eighs = [key for key in shared if key[0] == "eigh"]
    assert len(eighs) < factors + grams + dense  # every bias's matrix is its weight's A: decomposed once
    assert len(eighs) == factors + grams
    assert len([key for key in shared if key[0] == "svd"]) == grams
