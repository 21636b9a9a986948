"""hbpc.runtime: what every generated module imports. Pure torch: it loads without sympy, networkx or the compiler.

``CurvatureModule`` (base.py) holds the model-independent methods; blocks.py the curvature blocks;
checks.py the argument and state checks; helpers.py, conv.py, nd.py, norm.py and bilinear.py the tensor helpers the
generated per-node methods call.
"""
from . import bilinear, blocks, checks, conv, helpers, nd, norm
from .base import CurvatureModule

_MODULES = (checks, helpers, blocks, conv, nd, norm, bilinear)
# Every public name a generated module may import: {name: object}.
NAMES = {name: value for module in _MODULES for name, value in vars(module).items()
         if not name.startswith("_") and getattr(value, "__module__", module.__name__) == module.__name__
         and not isinstance(value, type(checks))}
NAMES["CurvatureModule"] = CurvatureModule
globals().update(NAMES)
__all__ = sorted(NAMES)
