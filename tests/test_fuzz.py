"""Property-based architecture fuzzing: random chain models against the autograd references.

hypothesis draws tiny `nn.Sequential` chains from every supported op (Linear, Conv2d with random
kernel, stride, padding, dilation, groups and bias, MaxPool2d, AvgPool2d, ZeroPad2d, Flatten, LayerNorm (with and without weight and bias), ReLU,
Sigmoid, Tanh and the other elementwise rules: ELU, SELU, LeakyReLU, Softplus, GELU, SiLU, Mish,
LogSigmoid, Softsign, Hardtanh, Identity), input sizes and losses (CrossEntropyLoss with and
without label smoothing, MSELoss, BCEWithLogitsLoss, HuberLoss, SmoothL1Loss; mean / sum). Each model is compiled with `hbpc.compile_model` and checked in float64 by
`fuzz_models.check_case`: loss and gradients, `block_products` for all four curvatures at N = 1
and N = 2 or 3 (the exact recursion), `blocks` at N = 1 for `hessian` and `ggn` with all flag
combinations (the true blocks), and one drawn `blocks` setting at N > 1 against the per-sample
HBP reference. `fuzz_models.REGRESSIONS` (bugs found and fixed) run first, every time. A quarter of the
drawn models, and `test_kinks_match_autograd` for every piecewise activation, sit exactly on (and 1e-12
beside) the kinks of ReLU/ELU/SELU/LeakyReLU/Hardtanh, where the derivatives must be torch autograd's.

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
import torch

pytest.importorskip("hypothesis", reason="architecture fuzzing needs hypothesis (pip install -e '.[test]')")

from hypothesis import HealthCheck, Phase, assume, example, given, note, seed, settings  # noqa: E402

from fuzz_models import KINKS, KNOWN_BUGS, REGRESSIONS, Case, cases, check_case, known_bugs  # noqa: E402

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


def _kinked(code):
    return ("relu", ()) if code == "relu" else ("activation", (("code", code),))


def _linear(i, o):
    return ("linear", (("in", i), ("out", o), ("bias", True)))


KINK_CASES = {  # id: (activation code, the case)
    **{f"{code}-after-linear": (code, Case((3,), (_linear(3, 6), _kinked(code), _linear(6, 3)), "cross_entropy", "mean",
                                           3, 0, hbp_mode="hessian", hbp_flags=(False, False), kinks=True))
       for code in KINKS},
    **{f"{code}-on-the-input": (code, Case((6,), (_kinked(code), _linear(6, 2)), "mse", "sum", 2, 1, hbp_mode="pch-abs",
                                           kinks=True)) for code in KINKS},
}


@pytest.mark.parametrize("name", list(KINK_CASES))
def test_kinks_match_autograd(name):
    """Loss, gradient, every block product and block at inputs exactly on a kink equal torch autograd's."""
    code, case = KINK_CASES[name]
    x, _ = case.data(case.batch)
    with torch.no_grad():
        pre_activation = x if case.layers[0][0] != "linear" else case.build()[0](x)
    on_kink = (pre_activation[..., None] == torch.tensor(KINKS[code], dtype=x.dtype)).any(-1)
    assert on_kink[:, 0].all(), "unit 0 must sit exactly on a kink for every sample"
    check_case(case)
