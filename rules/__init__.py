"""The rule table: every op hbpc understands, keyed by its normalised name.

``TABLE`` maps an op key (and each alias) to its rule. ``LOSS_TABLE`` does the same for losses.
"""
from .elementwise import ELEMENTWISE
from .losses import LOSSES
from .structured import SELECTIONS, STRUCTURED


def _keyed(rules):
    return {name: rule for rule in rules for name in (rule.key, *rule.aliases)}


OPS = [*ELEMENTWISE, *STRUCTURED, *SELECTIONS]
TABLE = _keyed(OPS)
LOSS_TABLE = _keyed(LOSSES)
