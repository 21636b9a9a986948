"""Linear algebra on a generated ``Curvature``: operators, eigenvalues, traces (no compiler imports).

    curvature.forward_backward(x, y)
    G = full_operator(curvature, "ggn")            # torch operator: G @ v, G.matmat(V), G.to_dense()
    values, vectors = lanczos(G, k=10, generator=0)
    trace = hutchpp_trace(G, num_matvecs=90, generator=0)
    scipy_G = to_scipy(G)                          # scipy.sparse.linalg.LinearOperator, float64 numpy

    G = full_operator(curvature, "ggn", data=loader)    # over a whole dataset (one pass per product)
    K = kronecker_operator(curvature, "kflr", data=loader)
    K.logdet(1e-3), K.inverse(1e-3, damping_split="pi") @ v, G.inverse(1e-3, preconditioner=...) @ v
"""

from hbpc.linalg.dataset import blocks, forward_backward, kronecker_factors
from hbpc.linalg.eigen import eigsh, lanczos
from hbpc.linalg.inverse import BlockDiagonalOperator, cg_inverse, neumann_inverse
from hbpc.linalg.operators import (
    CurvatureOperator,
    block_product_operator,
    full_operator,
    hbp_block_operator,
    kronecker_operator,
    to_scipy,
)
from hbpc.linalg.trace import diagonal, hutchinson_diagonal, hutchinson_trace, hutchpp_trace

__all__ = [
    "BlockDiagonalOperator",
    "CurvatureOperator",
    "blocks",
    "cg_inverse",
    "diagonal",
    "forward_backward",
    "kronecker_factors",
    "kronecker_operator",
    "neumann_inverse",
    "block_product_operator",
    "eigsh",
    "full_operator",
    "hbp_block_operator",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "to_scipy",
]
