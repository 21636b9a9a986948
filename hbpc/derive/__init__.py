"""Stage 2: derive every rule's expressions with sympy.

Derivations are memoised in memory and on disk (``$HBPC_CACHE_DIR``, default
``~/.cache/hbpc``), keyed by the rule's mathematics, the derive sources and the hbpc version.
"""
import hashlib
import os
import pickle
from pathlib import Path

import sympy as sp

from hbpc import __version__
from hbpc.rules.spec import Elementwise, Loss, Normalization, Selection, Structured, X, n

from .elementwise import ElementwiseDerivation, derive_elementwise
from .loss import LossDerivation, derive_loss
from .normalization import NormalizationDerivation, derive_normalization
from .structured import StructuredDerivation, derive_structured

_MEMO = {}


_SOURCES = hashlib.sha256("".join(p.read_text() for p in sorted(Path(__file__).parent.glob("*.py"))).encode()).hexdigest()


def _derive_now(rule):
    if isinstance(rule, Elementwise):
        return derive_elementwise(rule)
    if isinstance(rule, Structured):
        return derive_structured(rule, X, n)
    if isinstance(rule, Loss):
        return derive_loss(rule)
    if isinstance(rule, Normalization):
        return derive_normalization(rule)
    if isinstance(rule, Selection):
        return None
    raise TypeError(f"not a rule: {rule!r}")


def _fingerprint(rule) -> str:
    math = [type(rule).__name__, rule.key]
    for name in ("phi", "statistics", "expr", "ell", "out", "params", "input_view", "primitive"):
        if hasattr(rule, name):
            math.append(sp.srepr(getattr(rule, name)) if name != "input_view" else getattr(rule, name))
    math.append(sorted(getattr(rule, "hyper", {})))  # elementwise derivations probe with the hyper-parameters
    text = "\n".join(map(str, math)) + __version__ + _SOURCES
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _cache_file(rule) -> Path:
    folder = Path(os.environ.get("HBPC_CACHE_DIR", Path.home() / ".cache" / "hbpc"))
    return folder / f"{rule.key}-{_fingerprint(rule)}.pickle"


def derive(rule):
    """The derivation of one rule: Elementwise-, Structured-, Normalization- or LossDerivation (None for selections).

    Memoised by the rule's content (its fingerprint), never by its identity: a new rule object
    with other mathematics always gets its own derivation.
    """
    key = _fingerprint(rule)
    if key in _MEMO:
        return _MEMO[key]
    path = _cache_file(rule)
    try:
        _MEMO[key] = pickle.loads(path.read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
        _MEMO[key] = _derive_now(rule)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(pickle.dumps(_MEMO[key]))
        except OSError:
            pass  # an unwritable cache only costs time
    return _MEMO[key]


__all__ = ["derive", "ElementwiseDerivation", "StructuredDerivation", "LossDerivation", "NormalizationDerivation"]
