"""hbpc: a symbolic curvature compiler for PyTorch (Hessian backpropagation as generated code).

``hbpc.compile_model`` is imported lazily so that the runtime (``hbpc.optim``, ``hbpc.data``)
never loads the compiler.
"""
__version__ = "0.1.0"
__all__ = ["compile_model", "HbpcError", "__version__"]


def __getattr__(name):
    if name == "compile_model":
        from hbpc.compiler import compile_model

        return compile_model
    if name == "HbpcError":
        from hbpc.errors import HbpcError

        return HbpcError
    raise AttributeError(f"module 'hbpc' has no attribute {name!r}")
