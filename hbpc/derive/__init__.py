"""Stage 2: derive every rule's expressions with sympy (memoised per rule)."""
from hbpc.rules.spec import Elementwise, Loss, Selection, Structured, X, n

from .elementwise import ElementwiseDerivation, derive_elementwise
from .loss import LossDerivation, derive_loss
from .structured import StructuredDerivation, derive_structured

_MEMO = {}


def derive(rule):
    """The derivation of one rule: Elementwise-, Structured- or LossDerivation (None for selections)."""
    key = (type(rule).__name__, rule.key, id(rule))
    if key not in _MEMO:
        if isinstance(rule, Elementwise):
            _MEMO[key] = derive_elementwise(rule)
        elif isinstance(rule, Structured):
            _MEMO[key] = derive_structured(rule, X, n)
        elif isinstance(rule, Loss):
            _MEMO[key] = derive_loss(rule)
        elif isinstance(rule, Selection):
            _MEMO[key] = None
        else:
            raise TypeError(f"not a rule: {rule!r}")
    return _MEMO[key]


__all__ = ["derive", "ElementwiseDerivation", "StructuredDerivation", "LossDerivation"]
