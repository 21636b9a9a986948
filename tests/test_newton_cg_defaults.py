"""NewtonCG with its default arguments on user-style models and the example models; its safeguards
(singular systems, divergence warning, loss checks, line search) and speed options (warm start,
preconditioners, curvature on a sub-batch), each checked for what it must compute.

Seeds are fixed; models and batches are tiny (the whole file runs in well under a minute).
"""

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import hbpc
from hbpc.compiler import import_generated
from hbpc.export import load_model_file
from hbpc.optim import PAPER, NewtonCG, SubsampledCurvature, cg

EXAMPLES = Path(__file__).parents[1] / "examples"
STEPS = 30


class ResidualMLP(nn.Module):
    """``out(h + relu(b(relu(h))))`` with ``h = a(x)``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        return self.out(h + torch.relu(self.b(torch.relu(h))))


def user_model(name):
    """``(model, loss_fn, x, y)``: the small models a user would write, with fixed seeds."""
    g = torch.Generator().manual_seed(0)
    images, vectors = torch.randn(32, 1, 8, 8, generator=g), torch.randn(32, 8, generator=g)
    labels, targets = torch.randint(0, 3, (32,), generator=g), torch.randn(32, 3, generator=g)
    torch.manual_seed(0)
    ce = nn.CrossEntropyLoss()
    if name == "cnn":  # the reproducer: loss 2.34 -> 2.2e7 with the former defaults
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 3)), \
            ce, images, labels
    if name == "relu-mlp":
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), ce, vectors, labels
    if name == "residual-mlp":
        return ResidualMLP(), ce, vectors, labels
    if name == "tanh-mlp-mse":
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)), nn.MSELoss(), vectors, targets
    if name == "layernorm-mlp":
        return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3)), ce, vectors, labels
    if name == "sigmoid-fcnn":
        return nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 3)), \
            ce, vectors, labels
    raise KeyError(name)


USER_MODELS = ["cnn", "relu-mlp", "residual-mlp", "tanh-mlp-mse", "layernorm-mlp", "sigmoid-fcnn"]
_CURVATURES = {}


def curvature_module(name):
    """The compiled module of a user model (once per session)."""
    if name not in _CURVATURES:
        model, loss_fn, x, _ = user_model(name)
        _CURVATURES[name] = hbpc.compile_model(model, x[:2], loss_fn)
    return _CURVATURES[name]


def train(curv, x, y, closure=True, steps=STEPS, **options):
    """``(first loss, final loss, optimizer, warnings)`` after ``steps`` NewtonCG steps on one batch."""
    opt = NewtonCG(curv.model.parameters(), curv, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.zero_grad()
            if closure:
                loss = opt.step(lambda: curv.forward_backward(x, y))
            else:
                loss = curv.forward_backward(x, y)
                opt.step()
            first = float(loss) if _ == 0 else first
        final = float(curv.forward_backward(x, y))
    return first, final, opt, [w for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("loop", ["closure", "plain"])
@pytest.mark.parametrize("name", USER_MODELS)
def test_defaults_decrease_the_loss_on_user_models(name, loop):
    model, loss_fn, x, y = user_model(name)
    curv = curvature_module(name).Curvature(model)
    first, final, opt, caught = train(curv, x, y, closure=loop == "closure")
    assert final < 0.8 * first, (first, final)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not caught


def test_former_defaults_diverge_on_the_cnn_with_a_warning_that_names_the_fix():
    """The paper's plain update with lr 0.1, α 0.02 on PCH-abs blocks (the former defaults) blows up."""
    model, loss_fn, x, y = user_model("cnn")
    curv = curvature_module("cnn").Curvature(model)
    first, final, _, caught = train(curv, x, y, steps=10, source="blocks", lr=0.1, alpha=0.02, curvature="pch-abs",
                                    **PAPER)
    assert final > 100 * first
    diverged = [str(w.message) for w in caught if str(w.message).startswith("NewtonCG diverges")]
    assert len(diverged) == 1, [str(w.message) for w in caught]
    message = diverged[0]
    assert "NewtonCG diverges: the loss rose from" in message
    for advice in ("raise alpha", "adaptive_damping=True", "line_search=True", "max_backtracks=2"):
        assert advice in message


EXAMPLE_MODELS = sorted(path.stem for path in (EXAMPLES / "models").glob("*.py"))


@pytest.mark.parametrize("name", EXAMPLE_MODELS)
def test_defaults_decrease_the_loss_on_example_models(name):
    """The checked-in generated module of every example model, 4 random inputs (images, or token ids and a label per
    token), 30 steps with a closure."""
    spec = load_model_file(EXAMPLES / "models" / f"{name}.py")
    Curvature = import_generated(EXAMPLES / "generated" / f"{name}.py").Curvature
    g = torch.Generator().manual_seed(0)
    shape = spec.example_input.shape[1:]
    ids = Curvature.INPUT_IDS
    x = torch.randint(ids, (4, *shape), generator=g) if ids else torch.randn(4, *shape, generator=g)
    out = Curvature.OUTPUT_SHAPE
    if Curvature.TOKENS:  # classes at class_axis, the rest positions
        axis = Curvature.TOKENS["class_axis"]
        y = torch.randint(out[0 if axis == 1 else -1], (4, *(out[1:] if axis == 1 else out[:-1])), generator=g)
    else:
        y = torch.randint(0, 10, (4,), generator=g)
    first, final, _, caught = train(Curvature(spec.model), x, y)
    assert final < first, (first, final)
    assert not caught


# ---- singular and undamped systems -----------------------------------------------------------


def dead_input_problem():
    """A linear classifier whose last input feature is always 0: its weight columns have zero curvature."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    x[:, -1] = 0.0
    y = torch.randint(0, 3, (16,), generator=g)
    torch.manual_seed(2)
    model = nn.Linear(4, 3).to(torch.float64)
    return model, nn.CrossEntropyLoss(), x, y


@pytest.mark.parametrize("average_parameter_jacobian", [True, False])
def test_direct_solve_of_singular_block_falls_back_to_gradient(average_parameter_jacobian):
    model, loss_fn, x, y = dead_input_problem()
    curv = hbpc.compile_model(model, x[:2], loss_fn).Curvature(model)
    opt = NewtonCG(model.parameters(), curv, lr=0.1, alpha=0.0, source="blocks", solver="direct", curvature="ggn",
                   average_parameter_jacobian=average_parameter_jacobian, **PAPER)
    curv.forward_backward(x, y)
    before, grad = model.weight.detach().clone(), model.weight.grad.clone()
    opt.step()
    stats = opt.last_stats.params["weight"]
    assert stats.fallback == "gradient" and stats.reason in ("singular block", "not a descent direction")
    torch.testing.assert_close(model.weight.detach(), before - 0.1 * grad)


def test_undamped_cg_on_rank_deficient_blocks_takes_a_bounded_step():
    """Averaged blocks ``S ⊗ x̄ x̄ᵀ`` with a nearly dead input: the undamped solution is huge (was: a weight at
    3e33 after two steps, silently); the step is capped at 10 max(‖θ‖, 1) and a warning names the fix."""
    model, loss_fn, x, y = dead_input_problem()
    x[:, -1] = 1e-3 * torch.randn(16, generator=torch.Generator().manual_seed(3), dtype=x.dtype)  # nearly singular
    curv = hbpc.compile_model(model, x[:2], loss_fn).Curvature(model)
    opt = NewtonCG(model.parameters(), curv, source="blocks", lr=1.0, alpha=0.0, curvature="ggn", cg_tol=1e-12,
                   cg_maxiter=100, **PAPER)
    curv.forward_backward(x, y)
    before = model.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="NewtonCG shortened oversized steps .*: the steps of weight were over 10 times"):
        opt.step()
    assert opt.last_stats.capped == ["weight"]
    assert (model.weight.detach() - before).norm() <= 10 * max(before.norm().item(), 1.0) * (1 + 1e-12)


def test_cg_on_singular_inconsistent_system_stops_at_zero_curvature():
    """``A = diag(1, 1e-20, 0)`` is singular in float64 arithmetic; ``b`` has components in its null space.

    The second CG direction has curvature 1e-20: dividing by it moved x to 2e20 before."""
    A = torch.diag(torch.tensor([1.0, 1e-20, 0.0], dtype=torch.float64))
    b = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    x, info = cg(A, b, tol=1e-12, maxiter=50)
    assert torch.isfinite(x).all() and x.abs().max() < 10
    assert info.negative_curvature and info.iterations == 1
    assert info.residual_norm == pytest.approx(torch.linalg.norm(b - A @ x).item(), rel=1e-6)


# ---- loss checks and line search --------------------------------------------------------------


def understated_least_squares():
    """Linear least squares whose blocks are 0.02 times too small (the step overshoots 50-fold)."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(12, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(5)
    model = nn.Linear(3, 2).to(torch.float64)
    module = hbpc.compile_model(model, x[:2], nn.MSELoss())

    class Understated(module.Curvature):
        def block_products(self, curvature="ggn", split=1):
            return {name: (lambda v, f=f: 0.02 * f(v)) for name, f in super().block_products(curvature).items()}

    return model, Understated(model), x, y


def loss_at(model, x, y, shift):
    """MSE after moving every parameter by ``shift[name]``."""
    with torch.no_grad():
        params = dict(model.named_parameters())
        out = torch.func.functional_call(model, {n: p + shift[n] for n, p in params.items()}, (x,))
        return nn.functional.mse_loss(out, y).item()


def test_line_search_minimises_the_full_ggn_model_along_the_step():
    """On least squares the GGN model is the loss: ``t`` lands on the minimum along ``s``."""
    model, curv, x, y = understated_least_squares()
    opt = NewtonCG(model.parameters(), curv, source="block_products", alpha=1e-8, cg_tol=1e-12,
                   **dict(PAPER, line_search=True, max_step=None))
    curv.forward_backward(x, y)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    step = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    assert opt.last_stats.scale < 0.2
    for p, b in zip(model.parameters(), before.values()):
        p.data.copy_(b)
    at = loss_at(model, x, y, step)
    assert at <= loss_at(model, x, y, {n: 0.9 * s for n, s in step.items()})
    assert at <= loss_at(model, x, y, {n: 1.1 * s for n, s in step.items()})


def test_rising_loss_backtracks_and_boosts_damping():
    model, curv, x, y = understated_least_squares()
    opt = NewtonCG(model.parameters(), curv, source="block_products", alpha=1e-3, cg_tol=1e-12,
                   **dict(PAPER, adaptive_damping=True, max_backtracks=3))
    loss = opt.step(lambda: curv.forward_backward(x, y))
    stats = opt.last_stats
    assert stats.accepted and stats.backtracks >= 1 and stats.scale == 0.25 ** stats.backtracks
    assert stats.loss_after <= loss.item() and stats.loss_after == pytest.approx(nn.MSELoss()(model(x), y).item())


def test_rising_loss_without_backtracks_undoes_the_step():
    model, curv, x, y = understated_least_squares()
    before = [p.detach().clone() for p in model.parameters()]
    opt = NewtonCG(model.parameters(), curv, source="block_products", alpha=1e-3, cg_tol=1e-12,
                   **dict(PAPER, adaptive_damping=True, max_backtracks=0))
    opt.step(lambda: curv.forward_backward(x, y))
    assert not opt.last_stats.accepted and opt.last_stats.scale == 0.0
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-12)
    assert opt.param_groups[0]["alpha"] > 1e-3


def test_non_finite_loss_moves_nothing_and_warns():
    model, loss_fn, x, y = user_model("relu-mlp")
    curv = curvature_module("relu-mlp").Curvature(model)
    opt = NewtonCG(model.parameters(), curv)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        curv.forward_backward(x, y)
        return torch.tensor(float("nan"))

    with pytest.warns(RuntimeWarning, match="the loss is not finite, so no step was taken; raise alpha"):
        opt.step(closure)
    assert opt.last_stats.skipped == "non-finite loss"
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ---- speed options: the same systems, solved faster ----------------------------------------------


def two_steps(curv, x, y, **options):
    """Parameters and stats after two plain steps of the paper's update with ``options``."""
    opt = NewtonCG(curv.model.parameters(), curv, lr=0.5, alpha=0.01, cg_tol=1e-10, cg_maxiter=500,
                   curvature="ggn", **{**PAPER, **options})
    iterations = []
    for _ in range(2):
        curv.forward_backward(x, y)
        opt.step()
        iterations.append(opt.last_stats.cg_iterations)
    return [p.detach().clone() for p in curv.model.parameters()], iterations


def double_model(name):
    model, loss_fn, x, y = user_model(name)
    model = model.to(torch.float64)
    return model, curvature_module(name).Curvature(model), x.to(torch.float64), y


@pytest.mark.parametrize("source", ["block_products", "blocks", "full"])
@pytest.mark.parametrize("option", [dict(warm_start=True), dict(preconditioner="diagonal"),
                                    dict(preconditioner="kronecker")], ids=["warm", "diagonal", "kronecker"])
def test_speed_options_solve_the_same_systems(source, option):
    extra = dict(average_parameter_jacobian=False) if source == "blocks" else {}
    reference, _ = two_steps(*double_model("sigmoid-fcnn")[1:], source=source, **extra)
    faster, _ = two_steps(*double_model("sigmoid-fcnn")[1:], source=source, **extra, **option)
    for p, q in zip(faster, reference):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)


def test_kronecker_preconditioner_is_the_exact_inverse_of_kronecker_blocks():
    """On KFRA blocks ``S ⊗ E[x xᵀ]`` the preconditioner inverts the damped weight block: CG converges at once."""
    iterations = {}
    for preconditioner in (None, "kronecker"):
        _, curv, x, y = double_model("sigmoid-fcnn")
        opt = NewtonCG(curv.model.parameters(), curv, alpha=0.01, cg_tol=1e-10, cg_maxiter=500, source="blocks",
                       average_parameter_jacobian=False, **dict(PAPER, preconditioner=preconditioner))
        curv.forward_backward(x, y)
        opt.step()
        iterations[preconditioner] = {n: s.cg_iterations for n, s in opt.last_stats.params.items() if "weight" in n}
    assert all(count <= 2 for count in iterations["kronecker"].values()), iterations
    assert all(count > 4 for count in iterations[None].values()), iterations


def test_preconditioned_cg_solves_the_system():
    g = torch.Generator().manual_seed(6)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    diagonal = torch.logspace(0, 4, 30, dtype=torch.float64)
    A = (q * torch.logspace(0, 0.5, 30, dtype=torch.float64)) @ q.T * diagonal.sqrt()[:, None] * diagonal.sqrt()
    b = torch.randn(30, generator=g, dtype=torch.float64)
    x, info = cg(A, b, tol=1e-10, M=lambda r: r / A.diagonal())
    _, plain = cg(A, b, tol=1e-10)
    torch.testing.assert_close(x, torch.linalg.solve(A, b))
    assert info.converged and info.iterations < plain.iterations


def test_warm_start_is_dropped_when_worse_than_zero():
    A, b = torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    _, bad = cg(A, b, x0=-b)
    _, good = cg(A, b, x0=0.9 * b, tol=1e-12)
    assert not bad.warm_start and good.warm_start and good.iterations == 1


def test_subsampled_curvature_keeps_the_full_gradient_and_the_subbatch_curvature():
    model, curv, x, y = double_model("relu-mlp")
    module = curvature_module("relu-mlp")
    sub = SubsampledCurvature(curv, 8)
    loss = sub.forward_backward(x, y)
    expected = torch.autograd.grad(nn.CrossEntropyLoss()(model(x), y), list(model.parameters()))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e)
    torch.testing.assert_close(loss, nn.CrossEntropyLoss()(model(x), y).detach())
    alone = module.Curvature(model)
    alone.forward_backward(x[:8], y[:8])
    v = [torch.randn_like(p) for p in model.parameters()]
    for got, want in zip(sub.ggn_vector_product(v), alone.ggn_vector_product(v)):
        torch.testing.assert_close(got, want)
    assert sub.model is model and SubsampledCurvature(curv, 0.25).samples(32) == 8


@pytest.mark.parametrize("size, error", [(0, ValueError), (1.5, ValueError), ("8", TypeError), (True, TypeError)])
def test_subsampled_curvature_rejects_bad_sizes(size, error):
    with pytest.raises(error, match="size"):
        SubsampledCurvature(object(), size)


def test_defaults_with_subsampled_curvature_decrease_the_loss():
    model, loss_fn, x, y = user_model("cnn")
    curv = SubsampledCurvature(curvature_module("cnn").Curvature(model), 0.25)
    first, final, _, caught = train(curv, x, y)
    assert final < 0.8 * first and not caught
