"""hbpc.linalg against dense float64 references: operators, eigenvalues, traces, diagonals.

References: the full Hessian from ``torch.autograd.functional.hessian`` on the flattened parameters,
the GGN ``Jᵀ ∇²_z L J`` from ``jacrev``, the exact and HBP diagonal blocks from ``reference.py``.
"""

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator

from conftest import compiled
from hbpc.linalg import (
    block_product_operator,
    eigsh,
    full_operator,
    hbp_block_operator,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    to_scipy,
)
from models import SETTINGS
from reference import hbp_blocks, recursion_blocks
from test_full_products import _true_ggn, _true_hessian

BY_ID = {setting.id: setting for setting in SETTINGS}
CE, MSE = "linear-sigmoid-linear_ce-mean", "linear-tanh-linear_mse-sum"
CONV = "conv-sigmoid-maxpool2-flatten-linear_ce-mean"


def bound(setting_id, N=3):
    """``(setting, model, x, t, curvature)`` after ``forward_backward`` on ``N`` samples."""
    setting = BY_ID[setting_id]
    model = setting.build()
    x, t = setting.data(N)
    curvature = compiled(setting).Curvature(model)
    curvature.forward_backward(x, t)
    return setting, model, x, t, curvature


def dense(mode, setting, x, t):
    """The dense full ``mode`` (``"ggn"`` or ``"hessian"``) matrix of a fresh copy of the model."""
    reference = _true_ggn if mode == "ggn" else _true_hessian
    return reference(setting.build(), setting.loss_fn(), x, t)


# ---- operators ------------------------------------------------------------------------------


@pytest.mark.parametrize("setting_id", [CE, MSE, CONV])
@pytest.mark.parametrize("mode", ["ggn", "hessian"])
def test_full_operator_products_equal_dense_matrix(setting_id, mode):
    setting, model, x, t, curvature = bound(setting_id)
    A = dense(mode, setting, x, t)
    op = full_operator(curvature, mode)
    n = A.shape[0]
    assert op.shape == (n, n) and op.dtype == torch.float64 and op.device == A.device
    V = torch.randn(n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op.matmat(V), A @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op @ V[:, 0], A @ V[:, 0], rtol=1e-10, atol=1e-12)
    as_list = op.matvec(op.unflatten(V[:, 0]))
    assert [tuple(o.shape) for o in as_list] == [tuple(p.shape) for p in model.parameters()]
    torch.testing.assert_close(op.flatten(as_list), A @ V[:, 0], rtol=1e-10, atol=1e-12)
    stacked = op.matmat(list(op.split(V).values()))
    assert [tuple(o.shape) for o in stacked] == [(5, *p.shape) for p in model.parameters()]
    torch.testing.assert_close(op.join(dict(zip(op.names, stacked))), A @ V, rtol=1e-10, atol=1e-12)

    scipy_op = to_scipy(op)
    assert isinstance(scipy_op, LinearOperator) and scipy_op.dtype == np.float64
    Vn, An = V.numpy(), A.numpy()
    np.testing.assert_allclose(scipy_op.matmat(Vn), An @ Vn, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(scipy_op @ Vn, An @ Vn, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(scipy_op.matvec(Vn[:, 0]), An @ Vn[:, 0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(scipy_op.rmatvec(Vn[:, 0]), An @ Vn[:, 0], rtol=1e-10, atol=1e-12)
    assert scipy_op.matvec(Vn[:, 0]).shape == (n,)


def test_matmat_is_one_generated_call():
    _, _, _, _, curvature = bound(CE)
    calls = []
    product = curvature.ggn_vector_product
    curvature.ggn_vector_product = lambda vs: calls.append(vs[0].shape[0]) or product(vs)
    op = full_operator(curvature, "ggn")
    to_scipy(op).matmat(np.ones((op.shape[0], 7)))
    op.matmat(torch.ones(op.shape[0], 4, dtype=torch.float64))
    assert calls == [7, 4]


def test_subset_of_full_operator_is_principal_submatrix():
    setting, model, x, t, curvature = bound(CE)
    G = dense("ggn", setting, x, t)
    offsets = np.cumsum([0] + [p.numel() for p in model.parameters()])
    ranges = dict(zip([name for name, _ in model.named_parameters()], zip(offsets[:-1], offsets[1:])))
    params = ["2.weight", "0.bias"]
    index = torch.cat([torch.arange(*ranges[name]) for name in params])
    op = full_operator(curvature, "ggn", params=params)
    torch.testing.assert_close(op.to_dense(), G[index][:, index], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("setting_id", [CE, CONV])
@pytest.mark.parametrize("mode", ["hessian", "pch-abs"])
def test_block_operators_equal_dense_block_diagonals(setting_id, mode):
    setting, model, x, t, curvature = bound(setting_id)
    exact = recursion_blocks(setting.build(), setting.loss_fn(), x, t, mode)
    scipy_exact = to_scipy(block_product_operator(curvature, mode))
    eye = np.eye(scipy_exact.shape[0])
    np.testing.assert_allclose(scipy_exact.matmat(eye), torch.block_diag(*exact.values()).numpy(), atol=1e-12)
    hbp = hbp_blocks(setting.build(), setting.loss_fn(), x, t, mode, False, True)
    hbp_op = hbp_block_operator(curvature, mode, average_input_jacobian=False)
    torch.testing.assert_close(hbp_op.to_dense(), torch.block_diag(*hbp.values()), rtol=1e-10, atol=1e-12)
    name = list(hbp)[-2]
    one = hbp_block_operator(curvature, mode, average_input_jacobian=False, params=name)
    np.testing.assert_allclose(to_scipy(one).matmat(np.eye(one.shape[0])), hbp[name].numpy(), rtol=1e-10, atol=1e-12)


# ---- eigenvalues ----------------------------------------------------------------------------


@pytest.mark.parametrize("solver", [eigsh, lanczos], ids=["eigsh", "lanczos"])
@pytest.mark.parametrize("mode, which", [("ggn", "LA"), ("hessian", "LA"), ("hessian", "SA"), ("hessian", "LM")])
def test_eigenvalues_equal_dense_eigh(solver, mode, which):
    setting, _, x, t, curvature = bound(MSE)
    exact = torch.linalg.eigvalsh(dense(mode, setting, x, t))
    expected = {"LA": exact.flip(0), "SA": exact, "LM": exact[exact.abs().argsort(descending=True)]}[which][:5]
    op = full_operator(curvature, mode)
    values, vectors = solver(op, k=5, which=which, generator=0)
    torch.testing.assert_close(values, expected, rtol=1e-9, atol=1e-10)
    assert vectors.shape == (op.shape[0], 5)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(5, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(op @ vectors, vectors * values, atol=1e-6 * values.abs().max(), rtol=0)


def test_lanczos_finds_every_eigenvalue_of_a_low_rank_ggn():
    """rank G ≤ N (C - 1) = 4 of n = 53: the Krylov space is exhausted and restarted many times."""
    setting, _, x, t, curvature = bound(CE, N=2)
    G = dense("ggn", setting, x, t)
    op = full_operator(curvature, "ggn")
    values, vectors = lanczos(op, k=op.shape[0], generator=1)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(G).flip(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(op.shape[0], dtype=torch.float64), rtol=0, atol=1e-10)


def test_eigensolvers_are_reproducible_and_lanczos_warns_when_stopped_early():
    _, _, _, _, curvature = bound(CONV)
    op = full_operator(curvature, "hessian")
    for solver in (eigsh, lanczos):
        first, second = solver(op, k=3, generator=5), solver(op, k=3, generator=torch.Generator().manual_seed(5))
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.warns(UserWarning, match="not converged after 4 iterations"):
        lanczos(op, k=3, maxiter=4, generator=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lanczos(op, k=3, generator=0)


# ---- traces and diagonals -------------------------------------------------------------------


def trace_errors(estimator, op, exact, num_matvecs, seeds=range(20)):
    """Mean absolute error of ``estimator(op, num_matvecs)`` over ``seeds``."""
    return np.mean([abs(estimator(op, num_matvecs, generator=seed).item() - exact) for seed in seeds])


@pytest.mark.parametrize("estimator, few, many", [(hutchinson_trace, 3, 300), (hutchpp_trace, 6, 300)],
                         ids=["hutchinson", "hutch++"])
def test_trace_error_shrinks_with_samples(estimator, few, many):
    setting, _, x, t, curvature = bound(MSE, N=8)
    op = full_operator(curvature, "hessian")
    exact = dense("hessian", setting, x, t).trace().item()
    error_few, error_many = trace_errors(estimator, op, exact, few), trace_errors(estimator, op, exact, many)
    assert error_many < 0.2 * error_few, (error_few, error_many)
    assert error_many < 0.05 * abs(exact)


def test_hutchpp_beats_hutchinson_on_low_rank_ggn():
    """rank G ≤ N (C - 1) = 16 of n = 53; 30 products: Hutch++ sketches 10 directions."""
    setting, _, x, t, curvature = bound(CE, N=8)
    op = full_operator(curvature, "ggn")
    exact = dense("ggn", setting, x, t).trace().item()
    hutchinson = trace_errors(hutchinson_trace, op, exact, 30)
    hutchpp = trace_errors(hutchpp_trace, op, exact, 30)
    assert hutchpp < 0.5 * hutchinson, (hutchpp, hutchinson)


def test_hutchpp_is_exact_when_the_sketch_covers_the_range():
    """rank G ≤ 4 ≤ ⌊12 / 3⌋: ``P G P = 0`` and the estimate is exact for every seed."""
    setting, _, x, t, curvature = bound(CE, N=2)
    exact = dense("ggn", setting, x, t).trace()
    estimate = hutchpp_trace(full_operator(curvature, "ggn"), 12, generator=3)
    torch.testing.assert_close(estimate, exact, rtol=1e-12, atol=0)


def test_diagonal_estimate_converges():
    """``E ‖estimate − diag(A)‖² = (‖A‖_F² − ‖diag(A)‖²) / m``: the error shrinks like ``1/√m``."""
    setting, model, x, t, curvature = bound(CONV)
    op = block_product_operator(curvature, "ggn")
    A = torch.block_diag(*recursion_blocks(setting.build(), setting.loss_fn(), x, t, "ggn").values())
    exact, off_diagonal = torch.diagonal(A), (A.square().sum() - torch.diagonal(A).square().sum()).item()
    for m in (10, 100, 1000):
        squared = np.mean([(hutchinson_diagonal(op, m, generator=seed) - exact).square().sum().item()
                           for seed in range(10)])
        assert 0.5 < squared / (off_diagonal / m) < 1.5, (m, squared, off_diagonal / m)
    pieces = op.unflatten(hutchinson_diagonal(op, 4, generator=0))
    assert [tuple(piece.shape) for piece in pieces] == [tuple(p.shape) for p in model.parameters()]


def test_estimators_are_reproducible():
    _, _, _, _, curvature = bound(CE)
    op = full_operator(curvature, "ggn")
    for estimator in (hutchinson_trace, hutchpp_trace, hutchinson_diagonal):
        assert torch.equal(estimator(op, 9, generator=7), estimator(op, 9, generator=torch.Generator().manual_seed(7)))
        assert not torch.equal(estimator(op, 9, generator=7), estimator(op, 9, generator=8))


def test_fisher_mc_operator_is_reproducible_and_estimates_the_ggn():
    setting, _, x, t, curvature = bound(CE)
    G = dense("ggn", setting, x, t)
    F = full_operator(curvature, "fisher-mc", samples=20000, generator=0).to_dense()
    assert (F - G).norm() <= 0.05 * G.norm()
    small = [full_operator(curvature, "fisher-mc", samples=2, generator=1).to_dense() for _ in range(2)]
    torch.testing.assert_close(small[0], small[1], rtol=0, atol=0)


# ---- argument checks ------------------------------------------------------------------------


def test_invalid_arguments():
    _, _, _, _, curvature = bound(CE)
    with pytest.raises(ValueError, match="curvature='pch-abs' is not one of 'ggn', 'hessian', 'fisher-mc'"):
        full_operator(curvature, "pch-abs")
    with pytest.raises(ValueError, match=r"unknown parameters \['fc.weight'\]"):
        block_product_operator(curvature, "ggn", params=["fc.weight"])
    with pytest.raises(ValueError, match="distinct parameters"):
        full_operator(curvature, "ggn", params=["0.bias", "0.bias"])
    op = full_operator(curvature, "ggn")
    with pytest.raises(ValueError, match=r"expected a matrix of shape \(53, k\)"):
        op.matmat(torch.zeros(52, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected 4 tensors"):
        op.matvec([torch.zeros(3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="k=54 must be between 1 and n=53"):
        lanczos(op, k=54)
    with pytest.raises(ValueError, match="which='BE' is not one of"):
        eigsh(op, which="BE")
    with pytest.raises(ValueError, match="num_matvecs=2 must be at least 3"):
        hutchpp_trace(op, 2)


# ---- example ----------------------------------------------------------------------------------


def test_spectrum_example_smoke(tmp_path, capsys, monkeypatch):
    """``examples/03_spectrum.py`` end to end on the digits fallback with two Adam steps."""
    path = Path(__file__).parents[1] / "examples" / "03_spectrum.py"
    monkeypatch.syspath_prepend(str(path.parent))  # the examples import their shared _common module
    spec = importlib.util.spec_from_file_location("spectrum_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--steps", "2", "--batch-size", "64", "--data-dir", str(tmp_path / "missing"),
                  "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "falling back to scikit-learn's digits" in printed and "top-10 GGN eigenvalues" in printed
    assert (tmp_path / "spectrum.png").stat().st_size > 10_000
