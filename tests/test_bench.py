"""The benchmark harness (bench/) on tiny sizes, so that it never rots.

Nothing here asserts a time: benchmarks never go into timed tests. The subprocess test runs
``python -m bench`` end to end on the tiny workload with BackPACK hidden, so the table must say
'not installed' for it while hbpc's timing path and a peer's value check still run. The
in-process tests check the peers' values against hbpc's where the peers are installed.
"""
import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import impls, worker  # noqa: E402
from bench.workloads import WORKLOADS, random_batch  # noqa: E402

import hbpc  # noqa: E402


def _table(text):
    """{(workload, quantity): {implementation: cell}} from the markdown results table."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    table = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header) or cells[0] == "workload":
            break
        table[(cells[0].split(" ")[0], cells[1])] = dict(zip(header[2:], cells[2:]))
    return table


def test_harness_end_to_end_with_a_missing_peer(tmp_path):
    out = tmp_path / "RESULTS.md"
    env = {k: v for k, v in os.environ.items() if k != "HBPC_BENCH_HIDE"}
    command = [sys.executable, "-m", "bench", "--workloads", "tiny", "--impls", "hbpc,BackPACK,torch.func",
               "--quantities", "blocks-ggn,products-ggn", "--hide", "backpack", "--threads", "1",
               "--budget", "0", "--min-reps", "1", "--max-reps", "1", "--warm-compile-only", "--jobs", "2",
               "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "Machine:" in text and f"torch {torch.__version__}" in text
    table = _table(text)
    blocks = table[("tiny", impls.QUANTITIES["blocks-ggn"][0])]
    vector = table[("tiny", impls.QUANTITIES["products-ggn"][0] + ": per vector (one per block, all blocks)")]
    for row in (blocks, vector):
        assert row["BackPACK"] == "not installed"
        assert "×" in row["hbpc"] and "MiB" in row["hbpc"], row  # hbpc's timing path ran
    assert vector["torch.func"].split(" · ")[-1].startswith("err "), vector  # checked against hbpc
    assert blocks["torch.func"].startswith("n/a")
    records = json.loads(out.with_suffix(".json").read_text())["records"]
    checked = [r for r in records if r["impl"] == "torch.func" and r.get("check")]
    assert checked and all(r["check"] == "ok" and r["check_err"] <= worker.TOLERANCE for r in checked)


@functools.cache
def _compiled(workload):
    model, example, loss_fn = WORKLOADS[workload].build_check()
    return impls.Hbpc(hbpc.compile_model(model, example, loss_fn))


def _values(workload, quantity, peer):
    model, example, loss_fn = WORKLOADS[workload].build_check()
    model = model.double()
    reference = _compiled(workload)
    x, y = random_batch(example, 4, dtype=torch.float64, seed=2)
    vectors = impls._vectors(model, 2, seed=3)
    ours = reference.values(quantity, model, x, y, loss_fn, vectors)
    return impls.compare(ours, peer.values(quantity, model, x, y, loss_fn, vectors))


@pytest.mark.skipif(importlib.util.find_spec("backpack") is None, reason="BackPACK not installed")
@pytest.mark.parametrize("workload, quantity", [("tiny", "blocks-ggn"), ("tiny", "blocks-hessian"),
                                                ("3c3d", "blocks-ggn")])
def test_backpack_hbp_factors_equal_hbpc_blocks(workload, quantity):
    """KFRA (and HBP with curv_type='hessian') factors equal hbpc's blocks with both flags False.

    (BackPACK 1.7.1's HBP with a residual fails after convolutions: add_diag_to_mat asserts a
    flat residual, so blocks-hessian is checked on the MLP only.)
    """
    err, notes = _values(workload, quantity, impls.BackPACK())
    assert err <= worker.TOLERANCE
    conv_weights = [n for n in notes if "conv weight" in n]
    assert len(conv_weights) == (3 if workload == "3c3d" else 0)  # the only blocks not compared


@pytest.mark.skipif(importlib.util.find_spec("curvlinops") is None, reason="curvlinops not installed")
@pytest.mark.parametrize("quantity", ["products-ggn", "products-hessian", "full-ggn", "full-hessian"])
@pytest.mark.parametrize("peer", ["BackPACK", "curvlinops", "torch.func"])
def test_peer_products_equal_hbpc(quantity, peer):
    implementation = impls.PEERS[peer]()
    try:
        err, _ = _values("tiny", quantity, implementation)
    except (impls.Unsupported, impls.Pending) as reason:
        pytest.skip(str(reason))
    assert err <= worker.TOLERANCE


def test_failures_become_statuses():
    assert worker.classify(worker.BenchTimeout(), 60)[0] == "timeout"
    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 9663676416 bytes. Error code 12 (Cannot allocate memory)")
    status, message = worker.classify(oom, 60)
    assert status == "oom" and "9.0 GiB" in message
    refusal = MemoryError("blocks() needs 10.79 GiB for the curvature at x, more than memory_limit (2.00 GiB)")
    assert worker.classify(refusal, 60)[0] == "refused"
    assert worker.classify(ValueError("bad"), 60) == ("error", "ValueError: bad")  # no traceback: no location


def test_compare_kronecker_against_dense():
    A, B = torch.randn(3, 3, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    ours = {"w": ("kron", (A, B)), "b": ("dense", A)}
    assert impls.compare(ours, {"w": ("dense", torch.kron(A, B)), "b": ("dense", A)})[0] < 1e-15
    assert impls.compare(ours, {"w": ("kron", (A, 2 * B)), "b": ("dense", A)})[0] == pytest.approx(0.5)
    skipped = impls.compare(ours, {"w": ("approx", "why"), "b": ("dense", A)})
    assert skipped[0] < 1e-15 and skipped[1] == ["w: not compared (why)"]
