"""hbpc as a laplace-torch curvature backend: ``Laplace(model, ..., backend=HBPCGGN)``.

Needs the ``laplace`` extra (``python bench/install.py laplace``; ``make test`` installs it).
"""

try:
    import laplace as _laplace_torch  # noqa: F401  (laplace-torch's top-level package)
except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "hbpc.laplace needs laplace-torch: install the extra with `python bench/install.py laplace` "
        "(pip install --no-deps, so that torch is not replaced)"
    ) from error

from hbpc.laplace.backend import HBPCGGN, HBPCHessian, HBPCInterface

__all__ = ["HBPCGGN", "HBPCHessian", "HBPCInterface"]
