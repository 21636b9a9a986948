"""Linear algebra on a generated ``Curvature``: operators, eigenvalues, traces (no compiler imports).

    curvature.forward_backward(x, y)
    G = full_operator(curvature, "ggn")            # torch operator: G @ v, G.matmat(V), G.to_dense()
    values, vectors = lanczos(G, k=10, generator=0)
    trace = hutchpp_trace(G, num_matvecs=90, generator=0)
    scipy_G = to_scipy(G)                          # scipy.sparse.linalg.LinearOperator, float64 numpy
"""

from hbpc.linalg.eigen import eigsh, lanczos
from hbpc.linalg.operators import (
    CurvatureOperator,
    block_product_operator,
    full_operator,
    hbp_block_operator,
    to_scipy,
)
from hbpc.linalg.trace import hutchinson_diagonal, hutchinson_trace, hutchpp_trace

__all__ = [
    "CurvatureOperator",
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
