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


# --- the on-disk cache -------------------------------------------------------------------------------------------

import pickle  # noqa: E402  (only to craft a malicious entry)

import pytest  # noqa: E402

import hbpc.derive as derive_module  # noqa: E402
from hbpc.derive.store import UnsafeEntry, dumps, expression, loads  # noqa: E402
from hbpc.rules import LOSSES, TABLE  # noqa: E402


class _Marker:
    """Unpickling this creates a marker file: proof that loading a cache entry ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache folder and an empty in-memory memo."""
    monkeypatch.setenv("HBPC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(derive_module, "_MEMO", {})
    return tmp_path / "cache"


def _fresh_derivation(rule):
    derive_module._MEMO.clear()
    return derive(rule)


def test_entries_are_json_and_read_back_equal(cache):
    rule = TABLE["sigmoid"]
    first = derive(rule)
    path = derive_module._cache_file(rule)
    assert path.parent == cache and path.suffix == ".json"
    assert loads(path.read_text()) == first
    assert _fresh_derivation(rule) == first


@pytest.mark.parametrize("content", [
    b"\x80\x04garbage", b"", b"{not json", b'{"value": 3}',  # garbage and a wrong object
    b'{"dataclass": "LossDerivation", "fields": {}}',  # a derivation of another kind, incomplete
    b'{"dataclass": "Missing", "fields": {}}',  # a class that does not exist
    b'{"dataclass": "ElementwiseDerivation", "fields": {"phi": {"sympy": "NoSuchClass(1)"}}}',
    b'{"dataclass": "ElementwiseDerivation", "fields": {"phi": {"sympy": "Integer("}}}',
], ids=["pickle-bytes", "empty", "truncated", "number", "other-kind", "missing-class", "missing-sympy-class",
        "bad-srepr"])
def test_corrupted_entries_are_rebuilt(cache, content):
    rule = TABLE["tanh"]
    truth = derive(rule)
    path = derive_module._cache_file(rule)
    path.write_bytes(content)
    assert _fresh_derivation(rule) == truth
    assert loads(path.read_text()) == truth  # the bad entry was replaced


def test_an_entry_of_another_rule_kind_is_rebuilt(cache):
    elementwise, loss = TABLE["tanh"], LOSSES[1]
    truth = derive(elementwise)
    derive_module._cache_file(elementwise).write_text(dumps(derive(loss)))
    assert _fresh_derivation(elementwise) == truth


def test_hbpc_rules_survives_a_corrupted_cache(cache, capsys):
    from hbpc.cli import main

    derive(TABLE["sigmoid"])
    for path in cache.iterdir():
        path.write_bytes(b"\x00garbage")
    assert main(["rules", "sigmoid"]) == 0
    assert "sigmoid" in capsys.readouterr().out


def test_a_crafted_pickle_entry_runs_no_code(cache, tmp_path):
    rule = TABLE["softsign"]
    truth = derive(rule)
    marker = tmp_path / "pwned"
    path = derive_module._cache_file(rule)
    path.write_bytes(pickle.dumps(_Marker(str(marker))))
    pickle.loads(pickle.dumps(_Marker(str(tmp_path / "control"))))  # the payload works when unpickled
    assert (tmp_path / "control").exists()
    assert _fresh_derivation(rule) == truth
    assert not marker.exists()


@pytest.mark.parametrize("srepr", [
    "__import__('os').system('touch {marker}')",
    "Symbol('x').__class__.__init__.__globals__['os'].system('touch {marker}')",
    "Add(\"__import__('os').system('touch {marker}')\")",  # sympify would eval a string argument
    "Symbol('x', **{{'commutative': __import__('os').system('touch {marker}')}})",
    "Integer(1) if __import__('os').system('touch {marker}') else Integer(0)",
    "Pow(Integer(10), Integer(10000000000000000000000))",  # not code, but it would never finish
])
def test_a_crafted_json_entry_runs_no_code(cache, tmp_path, srepr):
    rule = TABLE["softsign"]
    truth = derive(rule)
    marker = tmp_path / "pwned"
    payload = {"dataclass": "ElementwiseDerivation",
               "fields": {"phi": {"sympy": srepr.format(marker=marker)}, "d1": {"sympy": "Integer(1)"},
                          "d2": {"sympy": "Integer(0)"}}}
    import json

    derive_module._cache_file(rule).write_text(json.dumps(payload))
    with pytest.raises(UnsafeEntry):
        expression(srepr.format(marker=marker))
    assert _fresh_derivation(rule) == truth
    assert not marker.exists()


def test_the_test_session_uses_its_own_cache_folder():
    """Tests never read or write the user's derivation cache."""
    import os
    from pathlib import Path

    folder = Path(os.environ["HBPC_CACHE_DIR"]).resolve()
    assert folder != (Path.home() / ".cache" / "hbpc").resolve()
    assert os.environ.get("HBPC_TEST_CACHE_DIR") or folder.name.startswith("hbpc-test-cache-")
