"""Stage 2: derive every rule's expressions with sympy.

Derivations are memoised in memory and on disk (``$HBPC_CACHE_DIR``, default
``~/.cache/hbpc``), keyed by the rule's mathematics, the derive sources and the hbpc version.
Disk entries are JSON read back without ``eval`` or ``pickle`` (``store.py``); an entry that is
not the expected derivation (garbage, another object, a crafted file) is derived anew and replaced.
"""
import hashlib
import os
import tempfile
from pathlib import Path

import sympy as sp

from hbpc import __version__
from hbpc.kinds import handler
from hbpc.rules.spec import Bilinear, Elementwise, Loss, Normalization, Selection, Structured, X, n

from .bilinear import BilinearDerivation, derive_bilinear
from .elementwise import ElementwiseDerivation, derive_elementwise
from .loss import LossDerivation, derive_loss
from .normalization import NormalizationDerivation, derive_normalization
from .store import UnsafeEntry, dumps, loads
from .structured import StructuredDerivation, derive_structured

_MEMO = {}
_EXPECTED = {Elementwise: ElementwiseDerivation, Structured: StructuredDerivation, Loss: LossDerivation,
             Normalization: NormalizationDerivation, Selection: type(None), Bilinear: BilinearDerivation}


_SOURCES = hashlib.sha256("".join(p.read_text() for p in sorted(Path(__file__).parent.glob("*.py"))).encode()).hexdigest()


# Each rule kind's derivation, registered once (a selection's Jacobian is a structural primitive: nothing to derive).
DERIVATIONS = {Elementwise: derive_elementwise, Structured: lambda rule: derive_structured(rule, X, n), Loss: derive_loss,
               Normalization: derive_normalization, Selection: lambda rule: None, Bilinear: derive_bilinear}


def _derive_now(rule):
    return handler(DERIVATIONS, rule, "derivation")(rule)


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
    return folder / f"{_fingerprint(rule)}.json"


def _read_cached(path: Path, rule):
    """The derivation stored at ``path``, or ``None`` when there is none or it is not a valid one for ``rule``."""
    try:
        derivation = loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, UnsafeEntry):
        return None
    expected = next((kind for rule_type, kind in _EXPECTED.items() if isinstance(rule, rule_type)), None)
    return derivation if expected is not None and isinstance(derivation, expected) else None


def _write_cached(path: Path, derivation):
    """Store ``derivation`` atomically (a concurrent compile never reads half a file); failures only cost time."""
    text, tmp = dumps(derivation), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def derive(rule):
    """The derivation of one rule: Elementwise-, Structured-, Normalization-, Bilinear- or LossDerivation (None for
    selections).

    Memoised by the rule's content (its fingerprint), never by its identity: a new rule object
    with other mathematics always gets its own derivation.
    """
    key = _fingerprint(rule)
    if key in _MEMO:
        return _MEMO[key]
    path = _cache_file(rule)
    derivation = None if isinstance(rule, Selection) else _read_cached(path, rule)
    if derivation is None:
        derivation = _derive_now(rule)
        if derivation is not None:
            _write_cached(path, derivation)
    _MEMO[key] = derivation
    return derivation


from .annotations import annotate  # noqa: E402  (annotate derives through derive above)

__all__ = ["annotate", "derive", "ElementwiseDerivation", "StructuredDerivation", "LossDerivation", "NormalizationDerivation",
           "BilinearDerivation"]
