"""Derivations are memoised by content, and the on-disk cache can neither break a compile nor run code."""
import gc

import sympy as sp

from hbpc.derive import derive
from hbpc.rules.spec import Elementwise, x


def test_memo_is_keyed_by_content_not_identity():
    """A rule created after a freed rule (possibly at the same address) gets its own derivatives."""
    square = Elementwise("power", x**2)
    assert derive(square).d1 == 2 * x
    addresses = {id(square)}
    del square
    gc.collect()
    for _ in range(200):  # allocate until the freed address is reused, as in the reported failure
        cube = Elementwise("power", x**3)
        assert sp.simplify(derive(cube).d1 - 3 * x**2) == 0
        if id(cube) in addresses:
            break
        addresses.add(id(cube))
        del cube
    assert sp.simplify(derive(Elementwise("power", x**3)).d2 - 6 * x) == 0
    assert derive(Elementwise("power", x**2)).d1 == 2 * x


def test_same_object_with_new_content_is_derived_again():
    """The memo's key follows the mathematics: the same address holding x³ instead of x² is a new derivation."""
    rule = Elementwise("power_same_address", x**2)
    assert derive(rule).d1 == 2 * x
    object.__setattr__(rule, "phi", x**3)  # what a new rule at a freed rule's address looks like to id()
    assert sp.simplify(derive(rule).d1 - 3 * x**2) == 0
