"""The rule table: every op hbpc understands, keyed by its normalised name.

``TABLE`` maps an op key (and each alias) to its rule. ``LOSS_TABLE`` does the same for losses.
"""
from contextlib import contextmanager

from .elementwise import ELEMENTWISE
from .losses import LOSSES
from .normalization import AFFINE, NORMALIZATIONS
from .structured import SELECTIONS, STRUCTURED


def _keyed(rules):
    return {name: rule for rule in rules for name in (rule.key, *rule.aliases)}


OPS = [*ELEMENTWISE, *STRUCTURED, *NORMALIZATIONS, *AFFINE, *SELECTIONS]
TABLE = _keyed(OPS)
LOSS_TABLE = _keyed(LOSSES)


@contextmanager
def extended(rules):
    """``TABLE`` and ``LOSS_TABLE`` with user ``rules`` added (``hbpc compile --rules``) while the block runs."""
    from .spec import Loss

    saved = dict(TABLE), dict(LOSS_TABLE)
    TABLE.update(_keyed([r for r in rules if not isinstance(r, Loss)]))
    LOSS_TABLE.update(_keyed([r for r in rules if isinstance(r, Loss)]))
    try:
        yield
    finally:
        TABLE.clear(), TABLE.update(saved[0])
        LOSS_TABLE.clear(), LOSS_TABLE.update(saved[1])
