"""hbpc: a symbolic curvature compiler for PyTorch (Hessian backpropagation as generated code)."""
__version__ = "0.1.0"

from hbpc.compiler import compile_model  # noqa: E402
from hbpc.errors import HbpcError  # noqa: E402

__all__ = ["compile_model", "HbpcError", "__version__"]
