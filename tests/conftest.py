"""Shared fixtures: compiled modules for the zoo, cached per session."""
import os
import shutil
import tempfile

import pytest
import torch

# The derivation cache of this test session: never the user's ~/.cache/hbpc (nor an HBPC_CACHE_DIR they set).
# HBPC_TEST_CACHE_DIR names a folder to reuse between sessions on purpose (it is kept). Under pytest-xdist the
# workers inherit the controller's folder through _HBPC_SESSION_CACHE (entries are written atomically), and only
# the process that made the folder removes it.
_KEPT = os.environ.get("HBPC_TEST_CACHE_DIR")
_INHERITED = os.environ.get("_HBPC_SESSION_CACHE")
_SESSION_CACHE = _KEPT or _INHERITED or tempfile.mkdtemp(prefix="hbpc-test-cache-")
os.environ["HBPC_CACHE_DIR"] = os.environ["_HBPC_SESSION_CACHE"] = _SESSION_CACHE

import hbpc  # noqa: E402  (after the cache folder is chosen)

# The zoo's problems are tiny: one thread avoids contention on CI's two cores.
torch.set_num_threads(1)


def pytest_sessionfinish(session, exitstatus):
    if not (_KEPT or _INHERITED):
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite the golden generated modules")


_COMPILED = {}


def compiled(setting):
    """The generated module for a zoo setting (compiled once per session)."""
    if setting.id not in _COMPILED:
        model = setting.build()
        x, _ = setting.data(2)
        _COMPILED[setting.id] = hbpc.compile_model(model, x, setting.loss_fn())
    return _COMPILED[setting.id]


@pytest.fixture
def update_golden(request):
    return request.config.getoption("--update-golden")
