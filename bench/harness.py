"""``python -m bench``: run every (workload, implementation) worker, then print and write the table.

Each worker is a separate process under an address-space limit (``--mem-limit-gib``) and a
wall-clock limit, so an implementation that runs out of memory or time becomes a table cell
("OOM", "timeout") instead of an OOM kill or a hung run. hbpc's modules are compiled once per
workload (timed in a fresh process with an empty derivation cache, then again with a warm one).
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.impls import ORDER, QUANTITIES
from bench.workloads import DEFAULT, ROOT, WORKLOADS

MARK = "@@BENCH "
PHASE_LABEL = {"pass": "", "setup": "setup pass", "vector": "per vector (one per block, all blocks)"}
FULL_LABEL = {"setup": "setup pass", "vector": "per vector (all parameters)"}

# (workload, quantity, phase, bound, BackPACK's number from the issue)
TARGETS = [
    ("fcnn", "blocks-ggn", "pass", 2.0, "KFRA 9.7×"),
    ("3c3d", "blocks-ggn", "pass", "2GiB", "KFRA killed, OOM above 24 GiB"),
    ("fcnn", "products-ggn", "vector", 1.0, "GGNMP 1.66× per vector"),
    ("3c3d", "products-ggn", "vector", 2.0, "GGNMP 8.8×"),
    ("3c3d", "products-hessian", "vector", 2.0, "HMP 6.4×"),
]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(DEFAULT), help=f"comma-separated, from {sorted(WORKLOADS)}")
    parser.add_argument("--quantities", default=",".join(QUANTITIES), help=f"from {list(QUANTITIES)}")
    parser.add_argument("--impls", default=",".join(ORDER))
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every worker")
    parser.add_argument("--mem-limit-gib", type=float, default=8.0, help="address-space limit of each worker")
    parser.add_argument("--timeout", type=float, default=40.0, help="seconds per quantity and implementation")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing repetitions per quantity")
    parser.add_argument("--min-reps", type=int, default=3, help="fewest timing repetitions (unless the deadline is near)")
    parser.add_argument("--max-reps", type=int, default=11)
    parser.add_argument("--omp-wait-policy", default=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                        help="PASSIVE (default): idle OpenMP threads sleep instead of spinning; on a shared machine "
                             "spinning threads stall every parallel region (a 6 ms gradient took 230 ms)")
    parser.add_argument("--jobs", type=int, default=1, help="workers run at once (>1 only for smoke tests)")
    parser.add_argument("--warm-compile-only", action="store_true", help="skip the cold-cache compile")
    parser.add_argument("--hide", default=os.environ.get("HBPC_BENCH_HIDE", ""),
                        help="peers' packages to treat as not installed (e.g. backpack,curvlinops)")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def _phase_label(quantity, phase):
    return (FULL_LABEL if quantity.startswith("full-") else PHASE_LABEL)[phase]


def log(message):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


def _limit(bytes_):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (bytes_, bytes_))
    return apply


def run_worker(argv, env, limit_bytes=None, timeout=None):
    """Run ``python -m bench.worker argv``; (records, returncode, stderr tail, timed_out)."""
    command = [sys.executable, "-m", "bench.worker", *argv]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=_limit(limit_bytes) if limit_bytes else None)
        stdout, stderr, code, timed_out = done.stdout, done.stderr, done.returncode, False
    except subprocess.TimeoutExpired as expired:
        decode = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        stdout, stderr, code, timed_out = decode(expired.stdout), decode(expired.stderr), None, True
    records = [json.loads(line[len(MARK):]) for line in stdout.splitlines() if line.startswith(MARK)]
    return records, code, stderr[-2000:], timed_out


def worker_env(args, cache_dir=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    if cache_dir:
        env["HBPC_CACHE_DIR"] = str(cache_dir)
    if args.hide:
        env["HBPC_BENCH_HIDE"] = args.hide
    return env


def compile_workload(key, folder, args):
    """{"cold": s, "warm": s} or {"error": message}; writes <key>_full.py and <key>_check.py."""
    cache = Path(folder) / f"cache_{key}"
    out = {}
    for kind in ("cold", "warm"):
        if kind == "cold" and args.warm_compile_only:
            continue
        # cold: a fresh derivation cache; warm: the same cache, now filled (or the user's cache)
        env = worker_env(args, None if args.warm_compile_only else cache)
        records, code, stderr, timed_out = run_worker(
            ["compile", "--workload", key, "--out", str(folder), "--threads", str(args.threads)], env,
            timeout=600)
        if not records:
            reason = "timed out" if timed_out else f"exit {code}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}"
            return {"error": f"compile failed ({reason})"}
        out[kind] = records[0]["seconds"]
        out["hbpc"] = records[0]["hbpc"]
    return out


def peer_installed(impl, hidden):
    from bench.impls import IMPORTS

    module = IMPORTS[impl].split(".")[0]
    if module in hidden:
        return False
    return module == "torch" or importlib.util.find_spec(module) is not None


def measure(key, impl, folder, compiled, args):
    quantities = args.quantities.split(",")
    hidden = {name for name in args.hide.split(",") if name}
    base = {"workload": key, "impl": impl}
    if impl != "hbpc" and not peer_installed(impl, hidden):
        return [{**base, "quantity": q, "phase": p, "status": "not installed"}
                for q in ["gradient", *quantities] for p in (QUANTITIES[q][1] if q in QUANTITIES else (None,))]
    module, check = Path(folder) / f"{key}_full.py", Path(folder) / f"{key}_check.py"
    if impl == "hbpc" and "error" in compiled:
        return [{**base, "quantity": q, "phase": p, "status": "error", "message": compiled["error"]}
                for q in quantities for p in QUANTITIES[q][1]]
    argv = ["measure", "--workload", key, "--impl", impl, "--quantities", ",".join(quantities),
            "--threads", str(args.threads), "--timeout", str(args.timeout), "--budget", str(args.budget),
            "--min-reps", str(args.min_reps), "--max-reps", str(args.max_reps)]
    if module.exists():
        argv += ["--module", str(module)]
    if check.exists():
        argv += ["--check-module", str(check)]
    if args.verbose:
        argv.append("--verbose")
    hard = 60 + len(quantities) * (2 * args.timeout + 30)
    t0 = time.perf_counter()
    records, code, stderr, timed_out = run_worker(argv, worker_env(args), int(args.mem_limit_gib * 2**30), hard)
    log(f"  {key:5s} {impl:11s} {time.perf_counter() - t0:6.1f} s" + (f"  (exit {code})" if code else ""))
    if args.verbose and stderr.strip():
        log(stderr)
    seen = {(r["quantity"], r.get("phase")) for r in records}
    why = "worker killed after the hard time limit" if timed_out else \
        f"worker died (exit {code}): {stderr.strip().splitlines()[-1] if stderr.strip() else 'no message'}"
    for q in quantities:
        for p in QUANTITIES[q][1]:
            if (q, p) not in seen:
                records.append({**base, "quantity": q, "phase": p, "status": "crashed", "message": why})
    return records


# ---------------------------------------------------------------- machine


def machine(args):
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("torch", "backpack-for-pytorch", "curvlinops-for-pytorch", "hbpc"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:  # noqa: BLE001
            versions[package] = "not installed"
    return {"cpu": cpu, "cpus": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
            "versions": versions, "load": os.getloadavg()}


# ---------------------------------------------------------------- report


def _mem(mib):
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


class Notes:
    def __init__(self):
        self.items = []

    def ref(self, text):
        if text not in self.items:
            self.items.append(text)
        return f"[{self.items.index(text) + 1}]"


def cell(record, args, notes):
    if record is None:
        return "—"
    status = record["status"]
    message = record.get("message", "")
    if status == "ok" and record["quantity"] == "gradient":
        return f"{record['seconds'] * 1000:.1f} ms · {_mem(record['mem_mib'])}"
    if status == "ok":
        text = f"{record['ratio']:.2f}× · {_mem(record['mem_mib'])}"
        check = record.get("check")
        if check is None:
            return f"**{text}**"
        note = record.get("check_note")
        suffix = f" {notes.ref(record['impl'] + ', ' + record['workload'] + ': ' + note)}" if note else ""
        if check == "ok":
            return f"{text} · err {record['check_err']:.0e}{suffix}"
        if check == "mismatch":
            return f"~~{text}~~ mismatch: err {record['check_err']:.0e}{suffix} (not counted)"
        return f"~~{text}~~ unchecked{suffix} (not counted)"
    if status == "mismatch":
        note = record.get("check_note")
        suffix = f" {notes.ref(record['impl'] + ', ' + record['workload'] + ': ' + note)}" if note else ""
        return f"mismatch: err {record['check_err']:.0e}{suffix} (not timed, not counted)"
    if status == "not installed":
        return "not installed"
    if status == "n/a":
        return f"n/a {notes.ref(record['impl'] + ': ' + message)}"
    if status == "pending":
        return f"pending {notes.ref(message)}"
    if status == "oom":
        return f"OOM (> {args.mem_limit_gib:g} GiB limit) {notes.ref(record['impl'] + ', ' + record['workload'] + ': ' + message)}"
    if status == "timeout":
        where = f" {notes.ref(record['impl'] + ', ' + record['workload'] + ': ' + message)}" \
            if message.startswith("in the value check") else ""
        return f"timeout (> {args.timeout:g} s){where}"
    if status == "refused":
        return f"refused up front {notes.ref(record['impl'] + ', ' + record['workload'] + ': ' + message)}"
    return f"{status} {notes.ref(record['impl'] + ', ' + record['workload'] + ': ' + message)}"


def render(records, compiled, info, args, elapsed):
    notes = Notes()
    index = {(r["workload"], r["impl"], r["quantity"], r.get("phase")): r for r in records}
    impls = args.impls.split(",")
    workloads = args.workloads.split(",")
    v = info["versions"]
    lines = [
        "# hbpc benchmark: curvature cost against BackPACK, curvlinops and torch.func",
        "",
        f"Written by `make bench` (`python -m bench`) on {datetime.date.today().isoformat()} in {elapsed / 60:.1f} min.",
        "",
        f"**Machine:** {info['cpu']}, {info['cpus']} logical CPUs, torch {v['torch']} on {info['threads']} threads, "
        f"OMP_WAIT_POLICY={args.omp_wait_policy}, Python {info['python']}; hbpc {v['hbpc']}, BackPACK {v['backpack-for-pytorch']}, "
        f"curvlinops {v['curvlinops-for-pytorch']}. Load average at start {info['load'][0]:.2f}, "
        f"at end {info['end_load'][0]:.2f} (the machine may be shared: ratios are measured interleaved "
        "with the gradient in the same process to cancel most of that).",
        "",
        "**Data:** random inputs (standard normal) and random labels; cost does not depend on the data.",
        "",
        "**How to read a cell:** median time as a multiple of one gradient (forward + backward with "
        "autograd on the plain model, timed interleaved with the quantity in the same worker process) · "
        "peak RSS above the RSS before the call (first call, fresh state) · for peers, the largest relative "
        "error against hbpc's value of the same quantity, checked in float64 on the workload's reduced twin; "
        "a peer's number counts only when that error is ≤ 1e-6. Bold: hbpc. The gradient row gives absolute "
        "time and memory; the compile row hbpc's compile time with an empty / a warm derivation cache. "
        f"Each worker runs under a {args.mem_limit_gib:g} GiB address-space limit and a {args.timeout:g} s "
        "limit per quantity.",
        "",
        "| workload | quantity | " + " | ".join(impls) + " |",
        "|---|---|" + "---|" * len(impls),
    ]
    for key in workloads:
        workload = WORKLOADS[key]
        title = f"{key} (N={workload.batch})"
        row = [f"gradient: forward + backward (absolute)"]
        row += [cell(index.get((key, impl, "gradient", None)), args, notes) for impl in impls]
        lines.append(f"| {title} | " + " | ".join(row) + " |")
        comp = compiled.get(key, {})
        if "error" in comp:
            compile_cell = f"error {notes.ref('hbpc, ' + key + ': ' + comp['error'])}"
        else:
            compile_cell = " / ".join(f"{comp[k]:.1f} s" for k in ("cold", "warm") if k in comp)
        lines.append(f"| {key} | compile time (cold / warm cache) | " +
                     " | ".join(compile_cell if impl == "hbpc" else "no compile step" for impl in impls) + " |")
        for quantity in args.quantities.split(","):
            label, phases = QUANTITIES[quantity]
            for phase in phases:
                name = label + (f": {_phase_label(quantity, phase)}" if _phase_label(quantity, phase) else "")
                cells = [cell(index.get((key, impl, quantity, phase)), args, notes) for impl in impls]
                lines.append(f"| {key} | {name} | " + " | ".join(cells) + " |")
    lines += ["", *targets(index, args), "", "## Notes", ""]
    lines += [f"{i + 1}. {text}" for i, text in enumerate(notes.items)]
    lines += ["", *STATIC_NOTES]
    return "\n".join(lines) + "\n"


def targets(index, args):
    out = ["## Targets (issue 6)", "",
           "| workload | quantity | BackPACK in the issue | BackPACK here | hbpc target | hbpc here | met? |",
           "|---|---|---|---|---|---|---|"]
    present = set(args.workloads.split(","))
    for key, quantity, phase, bound, issue in TARGETS:
        if key not in present or quantity not in args.quantities.split(","):
            continue
        ours = index.get((key, "hbpc", quantity, phase))
        theirs = index.get((key, "BackPACK", quantity, phase))
        label = QUANTITIES[quantity][0] + (f", {_phase_label(quantity, phase)}" if _phase_label(quantity, phase) else "")

        def show(record):
            if record is None:
                return "—"
            if record["status"] == "ok":
                return f"{record['ratio']:.2f}×, {_mem(record['mem_mib'])}"
            return record["status"] + (f": {record.get('message', '')[:140]}" if record.get("message") else "")

        if bound == "2GiB":
            goal = "completes within 2 GiB, or refused up front"
            met = ours is not None and (ours["status"] == "refused" or
                                        (ours["status"] == "ok" and ours["mem_mib"] <= 2048))
        else:
            goal = f"≤ {bound:.1f}×"
            met = ours is not None and ours["status"] == "ok" and ours["ratio"] <= bound
        out.append(f"| {key} | {label} | {issue} | {show(theirs)} | {goal} | {show(ours)} | "
                   f"{'met' if met else '**missed**'} |")
    return out


STATIC_NOTES = [
    "### What each column runs",
    "",
    "* **hbpc**: the module `hbpc.compile_model` generates for the workload's model. Blocks: "
    "`forward_backward(x, y)` then `blocks(mode, average_input_jacobian=False, average_parameter_jacobian=False)` "
    "(linear weights come back as Kronecker factors `S ⊗ E[x xᵀ]`, biases dense, convolution weights as matrix-free "
    "operators whose cost is paid per product). Products: `forward_backward` (setup), then "
    "`block_products(mode)[name](v)` for every parameter, one vector each (per vector). KFLR: `forward_backward` "
    "then `kronecker_factors(\"kflr\")` against BackPACK's `KFLR()` backward (same conventions: G sums the output "
    "root factors over locations, A = E_n[Σ_l x_l x_lᵀ]; every factor is compared, convolutions included).",
    "* **BackPACK**: blocks with `ggn` are `KFRA()`, i.e. `HBP(curv_type=\"ggn\", loss_hessian_strategy=\"sum\", "
    "backprop_strategy=\"average\", ea_strategy=\"E[J^T E(H) J]\")`; with `hessian` the same options and "
    "`curv_type=\"hessian\"`. These match hbpc's recursion option by option: `\"sum\"` starts from Σ_n ∇²_{z_n} L "
    "(hbpc's S_z); `\"average\"` backpropagates one matrix E[Jᵀ S J] + mode(Σ_n R_n) per layer "
    "(average_input_jacobian=False; BackPACK has no E[J]ᵀ S E[J] variant); `\"E[J^T E(H) J]\"` gives the linear "
    "weight factor E[x xᵀ] (average_parameter_jacobian=False; `\"E(J^T) E(H) E(J)\"` would be x̄ x̄ᵀ but raises "
    "for convolutions). The `\"exact\"` and `\"sampling\"` loss-Hessian strategies backpropagate a square-root factor "
    "and belong to `backprop_strategy=\"sqrt\"` (KFLR/KFAC), a different quantity. Convolution weight factors differ "
    "from hbpc's E[J_θᵀ S J_θ] (BackPACK sums the output curvature over locations, a KFC-style approximation), "
    "so the check compares every other block: linear weight factors, all biases (convolution biases included). "
    "Products: one `loss.backward()` inside `with backpack(GGNMP() | HMP() | PCHMP(modify=\"abs\"))` (setup), "
    "then `p.ggnmp(v)` / `p.hmp(v)` / `p.pchmp(v)` for every parameter (per vector).",
    "* **curvlinops**: `GGNLinearOperator(model, loss, [p], [(x, y)])` per parameter (its block) and one "
    "`HessianLinearOperator(..., block_sizes=[1, 1, ...])`; setup is building the operators, and every product "
    "re-runs the forward pass (it caches nothing). No HBP/KFRA (its KFAC is KFAC/KFLR) and no PCH.",
    "* **torch.func**: hand-written `jvp` → loss-Hessian `jvp` → `vjp` for J_θᵀ H_z J_θ v and `jvp(grad(L))` for "
    "∇²_θ L v, one block at a time; like curvlinops it re-runs the forward pass per product.",
    "* **Full products** (`ggn_vector_product`, `hessian_vector_product`) are measured as soon as the generated "
    "module has them (otherwise 'pending'); BackPACK has none.",
    "",
    "### Known peer defects found by the value checks",
    "",
    "* BackPACK 1.7.1 `PCHMP`: `modified_residual_mat_prod` multiplies `hessian_diagonal(...)`, which already is "
    "φ″ ⊙ g, by the output gradient g once more, so its PCH products use |φ″ g²| instead of |φ″ g| (with that "
    "factor removed its values equal hbpc's to ~3e-16 on the tiny MLP). Hence 'mismatch' in every PCH-abs row.",
    "* BackPACK 1.7.1 `HBP` with a residual (`curv_type` hessian or pch) after a convolution: `add_diag_to_mat` "
    "asserts a flat residual, but a sigmoid on a conv output gives a (C, H, W) one: AssertionError.",
    "* BackPACK's max-pool HBP (`ea_jac_t_mat_jac_prod`) allocates with `torch.zeros(...)` in the default dtype; the "
    "float64 checks set the default dtype for it.",
]


# ---------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    for key in args.workloads.split(","):
        if key not in WORKLOADS:
            raise SystemExit(f"unknown workload {key!r}; choose from {sorted(WORKLOADS)}")
    for quantity in args.quantities.split(","):
        if quantity not in QUANTITIES:
            raise SystemExit(f"unknown quantity {quantity!r}; choose from {list(QUANTITIES)}")
    start = time.perf_counter()
    info = machine(args)
    log(f"bench: {info['cpu']}, torch {info['versions']['torch']}, {args.threads} threads")
    records, compiled = [], {}
    with tempfile.TemporaryDirectory(prefix="hbpc-bench-") as folder:
        for key in args.workloads.split(","):
            t0 = time.perf_counter()
            compiled[key] = compile_workload(key, folder, args)
            log(f"  {key:5s} compile     {time.perf_counter() - t0:6.1f} s {compiled[key].get('error', '')}")
        jobs = [(key, impl) for key in args.workloads.split(",") for impl in args.impls.split(",")]
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for result in pool.map(lambda job: measure(job[0], job[1], folder, compiled[job[0]], args), jobs):
                records.extend(result)
    info["end_load"] = os.getloadavg()
    text = render(records, compiled, info, args, time.perf_counter() - start)
    print(text)
    Path(args.out).write_text(text)
    json_path = Path(args.out).with_suffix(".json")
    json_path.write_text(json.dumps({"machine": info, "compile": compiled, "records": records}, indent=1) + "\n")
    log(f"bench: wrote {args.out} and {json_path.name} in {(time.perf_counter() - start) / 60:.1f} min")
    return 0
