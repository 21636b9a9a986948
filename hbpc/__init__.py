"""hbpc: a symbolic curvature compiler for PyTorch (Hessian backpropagation as generated code).

``hbpc.compile_model``, ``hbpc.load_model`` and ``hbpc.load_generated`` are imported lazily so that the runtime
(``hbpc.optim``, ``hbpc.data``) never loads the compiler.
"""
__version__ = "0.1.0"
__all__ = ["compile_model", "load_model", "load_generated", "HbpcError", "__version__"]


def __getattr__(name):
    if name in ("compile_model", "load_generated"):
        from hbpc import compiler

        return getattr(compiler, name)
    if name == "load_model":
        from hbpc.export.load import load_model

        return load_model
    if name == "HbpcError":
        from hbpc.errors import HbpcError

        return HbpcError
    raise AttributeError(f"module 'hbpc' has no attribute {name!r}")
