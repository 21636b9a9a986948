"""Property-based architecture fuzzing: random chain models against the autograd references.

hypothesis draws tiny `nn.Sequential` chains from every supported op (Linear, Conv2d with random
kernel, stride, padding, dilation, groups and bias, MaxPool2d, AvgPool2d, ZeroPad2d, Flatten, LayerNorm (with and without weight and bias), ReLU,
Sigmoid, Tanh and the other elementwise rules: ELU, SELU, LeakyReLU, Softplus, GELU, SiLU, Mish,
LogSigmoid, Softsign, Hardtanh, Identity), input sizes and losses (CrossEntropyLoss with and
without label smoothing, MSELoss, BCEWithLogitsLoss, HuberLoss, SmoothL1Loss; mean / sum). Each model is compiled with `hbpc.compile_model` and checked in float64 by
`fuzz_models.check_case`: loss and gradients, `block_products` for all four curvatures at N = 1
and N = 2 or 3 (the exact recursion), `blocks` at N = 1 for `hessian` and `ggn` with all flag
combinations (the true blocks), and one drawn `blocks` setting at N > 1 against the per-sample
HBP reference. `fuzz_models.REGRESSIONS` (bugs found and fixed) run first, every time.

Profiles (environment variables):

* `HBPC_FUZZ_EXAMPLES` models per run: 20 in `make test`, 500 in `make fuzz`;
* `HBPC_FUZZ_SEED`: a random seed instead of the fixed (derandomized) sequence;
* `HBPC_FUZZ_SHRINK`: shrink failures to a minimal model (default: on from 100 examples);
* `HBPC_FUZZ_KNOWN_BUGS=1`: also draw models that hit a known compiler bug (`fuzz_models.KNOWN_BUGS`).

A failure comes with a note: the op sequence with shapes and a line of code that rebuilds the
model (shrunk to a minimal model in the long profile).
"""
import os

import pytest

pytest.importorskip("hypothesis", reason="architecture fuzzing needs hypothesis (pip install -e '.[test]')")

from hypothesis import HealthCheck, Phase, assume, example, given, note, seed, settings  # noqa: E402

from fuzz_models import KNOWN_BUGS, REGRESSIONS, cases, check_case, known_bugs  # noqa: E402

EXAMPLES = int(os.environ.get("HBPC_FUZZ_EXAMPLES", "20"))
# Shrinking a failure recompiles hundreds of models (minutes): on for the long profile only.
SHRINK = os.environ.get("HBPC_FUZZ_SHRINK", "1" if EXAMPLES >= 100 else "0") == "1"
SEED = os.environ.get("HBPC_FUZZ_SEED")
INCLUDE_KNOWN_BUGS = os.environ.get("HBPC_FUZZ_KNOWN_BUGS") == "1"


def _profile(test):
    test = settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=SEED is None,
        database=None,
        print_blob=True,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target] + ([Phase.shrink] if SHRINK else []),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )(test)
    return seed(int(SEED))(test) if SEED is not None else test


def _regressions(test):
    for case in REGRESSIONS.values():
        test = example(case)(test)
    return test


@_profile
@_regressions
@given(cases())
def test_random_chain_matches_references(case):
    if not INCLUDE_KNOWN_BUGS:
        assume(not known_bugs(case))
    note(case.describe())
    check_case(case)


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[name].reason))
             for name in KNOWN_BUGS] or [pytest.param(None, marks=pytest.mark.skip(reason="no known bugs"))],
)
def test_known_bug_reproducer(name):
    """The minimal reproducer of each known bug; fails (XPASS) once the bug is fixed."""
    bug = KNOWN_BUGS[name]
    assert bug.hits(bug.reproducer)
    check_case(bug.reproducer)
