"""The rule table: every op hbpc understands, keyed by its normalised name.

``TABLE`` maps an op key (and each alias) to its rule. ``LOSS_TABLE`` does the same for losses.
"""
from contextlib import contextmanager

from .bilinear import BILINEAR
from .elementwise import ELEMENTWISE
from .losses import LOSSES
from .normalization import AFFINE, NORMALIZATIONS, SOFTMAX
from .structured import SELECTIONS, SHAPE_OPS, STRUCTURED


def _keyed(rules):
    return {name: rule for rule in rules for name in (rule.key, *rule.aliases)}


OPS = [*ELEMENTWISE, *STRUCTURED, *SHAPE_OPS, *NORMALIZATIONS, *SOFTMAX, *AFFINE, *SELECTIONS, *BILINEAR]
TABLE = _keyed(OPS)
LOSS_TABLE = _keyed(LOSSES)


USER_KEYS = set()  # names of the user rules in force (module classes match them by lower-cased class name)


def _collisions(rules) -> list:
    builtin = set(TABLE) | set(LOSS_TABLE)
    return [(rule.key, name) for rule in rules if not getattr(rule, "override", False)
            for name in (rule.key, *rule.aliases) if name in builtin]


@contextmanager
def extended(rules):
    """``TABLE`` and ``LOSS_TABLE`` with user ``rules`` added (``hbpc compile --rules``) while the block runs.

    A user rule named like a built-in one (key or alias) is refused unless it says ``override=True``.
    """
    from hbpc.errors import HbpcError

    from .spec import Loss

    clashes = _collisions(rules)
    if clashes:
        key, name = clashes[0]
        raise HbpcError(f"user rule '{key}' has the name '{name}' of a built-in rule, which it would replace",
                        f"rule '{key}'", f"rename the rule (and its module class), or pass override=True to the rule "
                        "to replace the built-in one on purpose")
    saved = dict(TABLE), dict(LOSS_TABLE), set(USER_KEYS)
    TABLE.update(_keyed([r for r in rules if not isinstance(r, Loss)]))
    LOSS_TABLE.update(_keyed([r for r in rules if isinstance(r, Loss)]))
    USER_KEYS.update(name for r in rules for name in (r.key, *r.aliases))
    try:
        yield
    finally:
        TABLE.clear(), TABLE.update(saved[0])
        LOSS_TABLE.clear(), LOSS_TABLE.update(saved[1])
        USER_KEYS.clear(), USER_KEYS.update(saved[2])
