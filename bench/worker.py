"""One benchmark process: ``python -m bench.worker compile|measure ...``.

The harness starts one worker per (workload, implementation) under an address-space limit, so
that an implementation that runs out of memory raises an allocation error here (reported as
OOM) instead of being killed. Each result is one line ``@@BENCH <json>`` on stdout.

Measurement protocol, per quantity:

1. memory: from a fresh state (``gc``, ``malloc_trim``, peak RSS reset through
   ``/proc/self/clear_refs``), run the phases once; a phase's memory is its peak RSS minus the
   RSS just before it (this first run is also the warm-up);
2. time: interleave one autograd gradient (forward + backward of the plain model) and one run
   of the phases, repeated until the time budget is used (3 to 15 repetitions, fewer only when
   one repetition would overrun the deadline); each phase's ratio is median(phase) /
   median(gradient), both from this process and run;
3. check (peers only): the same quantity from hbpc and from the peer on the workload's reduced
   twin in float64; the quantity counts only when the largest relative error is ≤ 1e-6.

A quantity that passes its deadline raises ``BenchTimeout`` from a SIGALRM handler.
"""
import argparse
import ctypes
import gc
import json
import os
import re
import resource
import signal
import sys
import time
import traceback

TOLERANCE = 1e-6
_MARK = "@@BENCH "


def emit(record):
    sys.stdout.write(_MARK + json.dumps(record) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- memory


def _status_kib(field):
    with open("/proc/self/status") as handle:
        match = re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.M)
    return int(match.group(1)) if match else None


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Peak RSS above the RSS at entry, in MiB (VmHWM reset via clear_refs; ru_maxrss as fallback)."""

    def __enter__(self):
        _trim()
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.exact = True
        except OSError:
            self.exact = False
        self.base = _status_kib("VmRSS") or 0
        return self

    def __exit__(self, *exc):
        peak = _status_kib("VmHWM") if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mib = max(0.0, (peak - self.base) / 1024)
        return False


# ---------------------------------------------------------------- deadlines and failures


class BenchTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise BenchTimeout()


class Deadline:
    def __init__(self, seconds):
        self.seconds = seconds

    def __enter__(self):
        self.end = time.perf_counter() + self.seconds
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def left(self):
        return self.end - time.perf_counter()

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        return False


def classify(error, timeout):
    """(status, message) for an exception raised while measuring."""
    text = f"{type(error).__name__}: {error}".strip()
    if isinstance(error, BenchTimeout):
        return "timeout", f"did not finish within {timeout:g} s"
    if isinstance(error, MemoryError) and "memory_limit" in str(error):
        return "refused", str(error)
    allocation = re.search(r"tried to allocate (\d+) bytes", str(error))
    if isinstance(error, MemoryError) or allocation or "can't allocate memory" in str(error) \
            or "not enough memory" in str(error).lower():
        size = f" (one allocation of {int(allocation.group(1)) / 2**30:.1f} GiB)" if allocation else ""
        return "oom", f"out of memory under the worker's address-space limit{size}"
    frames = traceback.extract_tb(error.__traceback__)
    where = ""
    if frames:
        frame = frames[-1]
        parts = frame.filename.replace(os.sep, "/").split("/site-packages/")[-1].split("/")
        where = f" (at {'/'.join(parts[-3:])}:{frame.lineno} in {frame.name})"
    return "error", (text.splitlines()[0] if text else type(error).__name__)[:300] + where


# ---------------------------------------------------------------- timing


def median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def interleaved(gradient, phases, budget, deadline, min_reps=3, max_reps=15):
    """Alternate gradient and phases; returns (gradient times, {phase: times})."""
    grad_times, times = [], {name: [] for name in phases}
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        gradient()
        grad_times.append(time.perf_counter() - t0)
        for name, fn in phases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        reps = len(grad_times)
        elapsed = time.perf_counter() - start
        per_rep = elapsed / reps
        if reps >= max_reps or (reps >= min_reps and elapsed >= budget) or per_rep * 1.5 > deadline.left():
            return grad_times, times


# ---------------------------------------------------------------- commands


def _setup_torch(threads):
    import torch

    torch.set_num_threads(threads)
    return torch


def _hide(names):
    """Make ``import name`` fail for the given top-level packages (tests simulate missing peers)."""
    import importlib.abc

    class Hidden(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] in names:
                raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by HBPC_BENCH_HIDE)")
            return None

    sys.meta_path.insert(0, Hidden())


def command_compile(args):
    """Compile the workload's model (timed) and its reduced twin into args.out."""
    torch = _setup_torch(args.threads)
    from bench.workloads import WORKLOADS

    workload = WORKLOADS[args.workload]
    t0 = time.perf_counter()
    import hbpc
    from hbpc.compiler import compile_source, write_atomically

    model, example, loss_fn = workload.build()
    text = compile_source(model, example, loss_fn, source_name=f"{workload.key}")
    seconds = time.perf_counter() - t0
    write_atomically(os.path.join(args.out, f"{workload.key}_full.py"), text)
    check_model, check_example, check_loss = workload.build_check()
    text = compile_source(check_model, check_example, check_loss, source_name=f"{workload.key}_check")
    write_atomically(os.path.join(args.out, f"{workload.key}_check.py"), text)
    emit({"kind": "compile", "seconds": seconds, "hbpc": hbpc.__version__, "torch": torch.__version__})


def _load(path, name):
    from hbpc.compiler import import_generated

    return import_generated(path, name)


def _peer(name):
    from bench import impls

    return impls.PEERS[name]()


def command_measure(args):
    torch = _setup_torch(args.threads)
    from bench import impls
    from bench.workloads import WORKLOADS, random_batch

    workload = WORKLOADS[args.workload]
    base = {"workload": workload.key, "impl": args.impl}
    quantities = args.quantities.split(",")
    try:
        if args.impl == "hbpc":
            impl = impls.Hbpc(_load(args.module, f"bench_{workload.key}_full"))
        else:
            impl = _peer(args.impl)
    except ImportError as error:
        for quantity in ["gradient", *quantities]:
            emit({**base, "quantity": quantity, "status": "not installed", "message": str(error)})
        return
    except Exception as error:  # noqa: BLE001 - reported, never crashes the run
        for quantity in ["gradient", *quantities]:
            emit({**base, "quantity": quantity, "status": "error", "message": classify(error, 0)[1]})
        return

    model, example, loss_fn = workload.build()
    x, y = random_batch(example, workload.batch)

    def gradient():
        for p in model.parameters():
            p.grad = None
        loss_fn(model(x), y).backward()

    gradient()
    with PeakMemory() as memory:
        gradient()
    grad_times = []
    for _ in range(5):
        t0 = time.perf_counter()
        gradient()
        grad_times.append(time.perf_counter() - t0)
    emit({**base, "quantity": "gradient", "status": "ok", "seconds": median(grad_times), "mem_mib": memory.mib})

    reference = None
    if args.impl != "hbpc" and args.check_module:
        try:
            reference = impls.Hbpc(_load(args.check_module, f"bench_{workload.key}_check"))
        except Exception as error:  # noqa: BLE001
            reference = error

    for quantity in quantities:
        names = impls.QUANTITIES[quantity][1]
        check, started = None, time.perf_counter()
        try:
            if args.impl != "hbpc":
                # value check first (small, float64): a peer that disagrees with hbpc is not timed
                check = _check(impl, reference, quantity, workload, args)
                if check["check"] == "mismatch":
                    raise Mismatch()
                if check.get("failed"):  # the peer failed on the small case: not counted, so not timed
                    status, message = check.pop("failed")
                    records = {name: {"status": status, "message": f"in the value check: {message}"}
                               for name in names}
                    raise CheckFailed()
            records = _measure(impl, quantity, model, x, y, loss_fn, gradient, args)
        except CheckFailed:
            pass
        except Mismatch:
            records = {name: {"status": "mismatch", "message": "not timed: its values differ from hbpc's"}
                       for name in names}
        except (impls.Unsupported, impls.Pending) as error:
            status = "n/a" if isinstance(error, impls.Unsupported) else "pending"
            records = {name: {"status": status, "message": str(error)} for name in names}
        except BaseException as error:  # noqa: BLE001 - every failure becomes a table cell
            if isinstance(error, KeyboardInterrupt):
                raise
            status, message = classify(error, args.timeout)
            if status == "error" and args.verbose:
                traceback.print_exc()
            records = {name: {"status": status, "message": message} for name in names}
        _trim()
        for phase, record in records.items():
            emit({**base, "quantity": quantity, "phase": phase, **record, **(check or {}),
                  "wall_s": round(time.perf_counter() - started, 1)})


class Mismatch(Exception):
    pass


class CheckFailed(Exception):
    pass


def _measure(impl, quantity, model, x, y, loss_fn, gradient, args):
    with Deadline(args.timeout) as deadline:
        phases = impl.phases(quantity, model, x, y, loss_fn)
        mem, first = {}, {}
        for name, fn in phases.items():
            with PeakMemory() as memory:
                t0 = time.perf_counter()
                fn()
                first[name] = [time.perf_counter() - t0]
            mem[name] = memory.mib
        if 1.5 * sum(t[0] for t in first.values()) > deadline.left():
            # too slow to repeat within the deadline: the first (memory) run is the one sample
            t0 = time.perf_counter()
            gradient()
            grad_times, times = [time.perf_counter() - t0], first
        else:
            grad_times, times = interleaved(gradient, phases, args.budget, deadline, args.min_reps, args.max_reps)
    g = median(grad_times)
    return {name: {"status": "ok", "seconds": median(t), "grad_seconds": g, "ratio": median(t) / g,
                   "reps": len(t), "mem_mib": mem[name]} for name, t in times.items()}


def _check(impl, reference, quantity, workload, args):
    """{"check": "ok"|"mismatch"|"unchecked", "check_err": float|None, "check_note": str}."""
    import torch

    from bench import impls
    from bench.workloads import random_batch

    if reference is None or isinstance(reference, Exception):
        return {"check": "unchecked", "check_err": None,
                "check_note": f"no hbpc reference: {reference}" if reference else "no hbpc reference"}
    with Deadline(args.timeout):
        model, example, loss_fn = workload.build_check()
        model = model.double()
        x, y = random_batch(example, workload.check_batch, dtype=torch.float64, seed=2)
        vectors = impls._vectors(model, 2, seed=3)
        try:
            theirs = impl.values(quantity, model, x, y, loss_fn, vectors)
        except (impls.Unsupported, impls.Pending, KeyboardInterrupt):
            raise
        except BaseException as error:  # noqa: BLE001 - the peer failed
            return {"check": "failed", "check_err": None, "failed": classify(error, args.timeout)}
        try:
            ours = reference.values(quantity, model, x, y, loss_fn, vectors)
        except (impls.Unsupported, impls.Pending, KeyboardInterrupt):
            raise
        except BaseException as error:  # noqa: BLE001 - hbpc failed: time the peer, unchecked
            status, message = classify(error, args.timeout)
            return {"check": "unchecked", "check_err": None, "check_note": f"hbpc failed: {status}: {message}"}
        err, notes = impls.compare(ours, theirs)
    status = "ok" if err <= TOLERANCE else "mismatch"
    return {"check": status, "check_err": err, "check_note": "; ".join(notes)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    parser.add_argument("command", choices=["compile", "measure"])
    parser.add_argument("--workload", required=True)
    parser.add_argument("--impl", default="hbpc")
    parser.add_argument("--quantities", default="")
    parser.add_argument("--module")
    parser.add_argument("--check-module")
    parser.add_argument("--out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--budget", type=float, default=3.0)
    parser.add_argument("--min-reps", type=int, default=3)
    parser.add_argument("--max-reps", type=int, default=15)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    hidden = [name for name in os.environ.get("HBPC_BENCH_HIDE", "").split(",") if name]
    if hidden:
        _hide(hidden)
    if args.command == "compile":
        command_compile(args)
    else:
        command_measure(args)


if __name__ == "__main__":
    main()
