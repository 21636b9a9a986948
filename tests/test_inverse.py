"""Inverse operators, log-determinants and traces against dense ``torch.linalg`` in float64."""

import math

import pytest
import torch

from conftest import compiled
from hbpc.linalg import (
    BlockDiagonalOperator,
    CurvatureOperator,
    full_operator,
    hbp_block_operator,
    kronecker_operator,
    neumann_inverse,
    to_scipy,
)
from models import SETTINGS

BY_ID = {setting.id: setting for setting in SETTINGS}
CE, CONV = "linear-sigmoid-linear_ce-mean", "conv-sigmoid-maxpool2-flatten-linear_ce-mean"
DAMPING = 0.3


def bound(setting_id, N=5):
    setting = BY_ID[setting_id]
    curvature = compiled(setting).Curvature(setting.build())
    curvature.forward_backward(*setting.data(N))
    return curvature


def eye(n):
    return torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("setting_id", [CE, CONV])
def test_cg_inverse_with_and_without_preconditioner(setting_id):
    curvature = bound(setting_id)
    G = full_operator(curvature, "ggn")
    expected = torch.linalg.inv(G.to_dense() + DAMPING * eye(G.shape[0]))
    plain = G.inverse(DAMPING, tol=1e-12)
    torch.testing.assert_close(plain.to_dense(), expected, rtol=1e-8, atol=1e-10)
    unpreconditioned = plain.info.iterations
    preconditioner = kronecker_operator(curvature, "kflr").inverse(DAMPING, damping_split="pi")
    B = torch.randn(G.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    preconditioned = G.inverse(DAMPING, preconditioner=preconditioner, tol=1e-12)
    torch.testing.assert_close(preconditioned @ B, expected @ B, rtol=1e-8, atol=1e-10)
    assert preconditioned.info.converged
    exact = G.inverse(DAMPING, preconditioner=expected, tol=1e-10)  # M = (A + λI)⁻¹: one iteration
    torch.testing.assert_close(exact @ B, expected @ B, rtol=1e-8, atol=1e-10)
    assert exact.info.iterations == 1 < unpreconditioned
    # the same interface as the forward operators: lists shaped like the parameters, SciPy
    vs = G.unflatten(B[:, 0])
    torch.testing.assert_close(G.flatten(plain.matvec(vs)), expected @ B[:, 0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(torch.from_numpy(to_scipy(plain) @ B[:, 0].numpy()), expected @ B[:, 0],
                               rtol=1e-8, atol=1e-10)


def test_cg_inverse_refuses_an_indefinite_operator():
    H = full_operator(bound(CE), "hessian")
    lowest = torch.linalg.eigvalsh(H.to_dense())[0].item()
    assert lowest < 0
    with pytest.raises(ValueError, match="not positive definite"):
        H.inverse(damping=0.0).to_dense()


@pytest.mark.parametrize("setting_id", [CE, CONV])
def test_kronecker_inverses_logdet_and_trace(setting_id):
    curvature = bound(setting_id)
    K = kronecker_operator(curvature, "kflr")
    dense = K.to_dense()
    exact = torch.linalg.inv(dense + DAMPING * eye(K.shape[0]))
    torch.testing.assert_close(K.inverse(DAMPING).to_dense(), exact, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(K.logdet(DAMPING), torch.logdet(dense + DAMPING * eye(K.shape[0])), rtol=1e-10, atol=0)
    torch.testing.assert_close(K.trace(DAMPING), torch.trace(dense) + DAMPING * K.shape[0], rtol=1e-12, atol=0)
    # π-damping: blocks (G + π√λ I) ⊗ (A + √λ/π I), π = sqrt((tr G / d_G) / (tr A / d_A)); biases G + λ I
    pieces = []
    for block in K.blocks.values():
        if block.kronecker_factors is None:
            pieces.append(block.to_dense() + DAMPING * eye(block.shape[0]))
            continue
        G, A = block.kronecker_factors
        pi = math.sqrt((torch.trace(G) / len(G)) / (torch.trace(A) / len(A)))
        root = math.sqrt(DAMPING)
        pieces.append(torch.kron(G + pi * root * eye(len(G)), A + root / pi * eye(len(A))))
    damped = torch.block_diag(*pieces)
    torch.testing.assert_close(K.inverse(DAMPING, damping_split="pi").to_dense(), torch.linalg.inv(damped),
                               rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(K.logdet(DAMPING, damping_split="pi"), torch.logdet(damped), rtol=1e-10, atol=0)
    torch.testing.assert_close(K.trace(DAMPING, damping_split="pi"), torch.trace(damped), rtol=1e-12, atol=0)


def test_dense_hbp_blocks_logdet_trace_inverse():
    curvature = bound(CE)
    B = hbp_block_operator(curvature, "pch-abs")
    assert isinstance(B, BlockDiagonalOperator)
    dense = B.to_dense()
    damped = dense + DAMPING * eye(B.shape[0])
    torch.testing.assert_close(B.inverse(DAMPING).to_dense(), torch.linalg.inv(damped), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(B.logdet(DAMPING), torch.logdet(damped), rtol=1e-10, atol=0)
    torch.testing.assert_close(B.trace(DAMPING), torch.trace(damped), rtol=1e-12, atol=0)


def test_logdet_refuses_a_singular_block():
    with pytest.raises(ValueError, match="positive definite"):
        kronecker_operator(bound(CE, N=1), "kflr").logdet(0.0)


def test_neumann_series_converges_to_the_inverse():
    generator = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=generator)).Q
    A = Q @ torch.diag(torch.linspace(0.5, 4.0, 12, dtype=torch.float64)) @ Q.T
    operator = CurvatureOperator(lambda vs: {"w": (A @ vs["w"].reshape(-1, 12).T).T.reshape(vs["w"].shape)},
                                 {"w": torch.Size([3, 4])}, torch.float64, torch.device("cpu"))
    expected = torch.linalg.inv(A + DAMPING * eye(12))
    approximation = neumann_inverse(operator, DAMPING, terms=400).to_dense()
    torch.testing.assert_close(approximation, expected, rtol=1e-9, atol=1e-11)
    few = neumann_inverse(operator, DAMPING, terms=5).to_dense()
    assert (few - expected).abs().max() > 1e-3  # truncation shows with few terms
    with pytest.raises(ValueError, match="terms"):
        neumann_inverse(operator, DAMPING, terms=0)
