"""Conjugate gradients: SPD convergence, SciPy stopping rule, negative curvature."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hbpc.optim import CGInfo, cg


def random_spd(n: int, seed: int, dtype=torch.float64, condition: float = 100.0) -> torch.Tensor:
    """``Q diag(logspace(0, log10(condition))) Qᵀ`` with a random orthogonal ``Q``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(0, math.log10(condition), n, dtype=torch.float64)
    return ((q * eigenvalues) @ q.T).to(dtype)


def random_vector(shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def callable_of(A: torch.Tensor, shape):
    """``v -> A vec(v)`` reshaped to ``shape``."""
    return lambda v: (A @ v.reshape(-1)).reshape(shape)


@pytest.mark.parametrize("n", [1, 5, 40])
@pytest.mark.parametrize("form", ["matrix", "callable"])
def test_spd_matches_linalg_solve(n, form):
    A, b = random_spd(n, seed=n), random_vector(n, seed=100 + n)
    x, info = cg(A if form == "matrix" else callable_of(A, (n,)), b, tol=1e-10)
    assert isinstance(info, CGInfo)
    assert info.converged and info.reason == "converged" and not info.negative_curvature
    assert 0 < info.iterations <= 10 * n
    assert info.residual_norm <= 1e-10 * b.norm().item()
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-7, atol=1e-9)
    assert torch.linalg.norm(b - A @ x) <= 1.01e-10 * b.norm() + 1e-12


@pytest.mark.parametrize("form", ["matrix", "callable"])
def test_parameter_shaped_right_hand_side(form):
    shape = (3, 2, 4)
    A, b = random_spd(24, seed=1), random_vector(shape, seed=2)
    x, info = cg(A if form == "matrix" else callable_of(A, shape), b, tol=1e-12)
    assert x.shape == shape and info.converged
    torch.testing.assert_close(x.reshape(-1), torch.linalg.solve(A, b.reshape(-1)))


def test_float32():
    A, b = random_spd(20, seed=3, dtype=torch.float32, condition=10.0), random_vector(20, seed=4, dtype=torch.float32)
    x, info = cg(A, b, tol=1e-5)
    assert x.dtype == torch.float32 and info.converged
    assert torch.linalg.norm(b - A @ x) <= 1e-4 * b.norm()


def test_stopping_rule_tol_and_atol():
    A, b = random_spd(30, seed=5, condition=1e4), random_vector(30, seed=6)
    _, loose = cg(A, b, tol=1e-2)
    _, tight = cg(A, b, tol=1e-8)
    assert loose.residual_norm <= 1e-2 * b.norm().item() and loose.iterations < tight.iterations
    _, by_atol = cg(A, b, tol=0.0, atol=0.5 * b.norm().item())
    assert by_atol.converged and by_atol.residual_norm <= 0.5 * b.norm().item()
    assert by_atol.iterations < tight.iterations


def test_initial_guess():
    A, b = random_spd(10, seed=7), random_vector(10, seed=8)
    exact = torch.linalg.solve(A, b)
    x, info = cg(A, b, x0=exact, tol=1e-6)
    assert info.converged and info.iterations == 0
    torch.testing.assert_close(x, exact)
    assert x is not exact
    x, info = cg(A, b, x0=exact + 1e-3, tol=1e-10)
    assert info.converged
    torch.testing.assert_close(x, exact)


def test_zero_rhs_returns_zero():
    x, info = cg(random_spd(4, seed=0), torch.zeros(4, dtype=torch.float64))
    assert info.converged and info.iterations == 0 and torch.equal(x, torch.zeros(4, dtype=torch.float64))


def test_maxiter_reported():
    A, b = random_spd(50, seed=9, condition=1e6), random_vector(50, seed=10)
    x, info = cg(A, b, tol=1e-12, maxiter=3)
    assert not info.converged and info.reason == "maxiter" and info.iterations == 3
    assert math.isclose(info.residual_norm, torch.linalg.norm(b - A @ x).item(), rel_tol=1e-6)


def test_default_maxiter_is_ten_n():
    """A noisy identity never reaches tol=0, so CG runs its default 10 n iterations."""
    g = torch.Generator().manual_seed(0)
    calls = []

    def noisy_identity(v):
        calls.append(1)
        return v + 1e-3 * v.norm() * torch.randn(v.shape, generator=g, dtype=v.dtype)

    x, info = cg(noisy_identity, torch.ones(3, dtype=torch.float64), tol=0.0)
    assert info.reason == "maxiter" and info.iterations == 30 and len(calls) == 30
    assert torch.isfinite(x).all()


def test_negative_curvature_at_start_returns_x0_without_nan():
    A = -torch.eye(3, dtype=torch.float64)
    b = torch.ones(3, dtype=torch.float64)
    x, info = cg(A, b)
    assert info.negative_curvature and not info.converged and info.iterations == 0
    assert info.reason == "negative curvature"
    assert torch.equal(x, torch.zeros(3, dtype=torch.float64))
    x0 = torch.full((3,), 0.5, dtype=torch.float64)
    x, info = cg(A, b, x0=x0)
    assert info.negative_curvature and torch.equal(x, x0)


def test_indefinite_stops_at_best_iterate():
    """diag(1, -0.5): the first direction has positive curvature, its conjugate one negative."""
    A = torch.diag(torch.tensor([1.0, -0.5], dtype=torch.float64))
    b = torch.tensor([1.0, 0.5], dtype=torch.float64)
    x, info = cg(A, b)
    assert info.negative_curvature and info.iterations == 1 and torch.isfinite(x).all()
    step = (b @ b) / (b @ A @ b)
    torch.testing.assert_close(x, step * b)
    quadratic = lambda v: 0.5 * v @ A @ v - b @ v  # noqa: E731
    assert quadratic(x) < quadratic(torch.zeros(2, dtype=torch.float64))


def test_zero_curvature_is_flagged():
    A = torch.zeros(2, 2, dtype=torch.float64)
    x, info = cg(A, torch.ones(2, dtype=torch.float64))
    assert info.negative_curvature and torch.equal(x, torch.zeros(2, dtype=torch.float64))


def test_non_finite_product_stops_cleanly():
    b = torch.ones(2, dtype=torch.float64)
    x, info = cg(lambda v: v * float("nan"), b)
    assert info.reason == "non-finite curvature" and not info.converged and not info.negative_curvature
    assert torch.isfinite(x).all()


def test_matrix_shape_checked():
    with pytest.raises(ValueError, match=r"matrix A has shape \(3, 3\), expected \(4, 4\)"):
        cg(torch.eye(3), torch.ones(2, 2))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 10_000), negative=st.integers(0, 12))
def test_never_nan_and_flags_indefinite(n, seed, negative):
    """Random symmetric systems with ``negative`` negative eigenvalues: finite output, honest flags."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    eigenvalues[: min(negative, n)] *= -1
    A, b = (q * eigenvalues) @ q.T, torch.randn(n, generator=g, dtype=torch.float64)
    x, info = cg(A, b, tol=1e-8)
    assert torch.isfinite(x).all()
    if negative == 0:
        assert info.converged and torch.linalg.norm(b - A @ x) <= 1e-7 * b.norm()
    if info.negative_curvature:
        assert not info.converged
