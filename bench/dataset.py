"""Dataset-level curvature and laplace-torch backends on Fashion-MNIST: ``python -m bench.dataset``.

Rows (every implementation of a row runs in the same process, interleaved round by round, median of
``--rounds``; the values are compared before the times count):

* ``laplace-kron``: ``Laplace(FCNN, "classification", subset_of_weights="all", hessian_structure="kron",
  backend=B).fit(loader)`` on the paper's FCNN (1.5 M parameters) over ``--samples`` training images;
* ``laplace-full-last-layer``: the same with ``hessian_structure="full"`` on the last layer (laplace-torch's
  default subset; a full GGN over all 1.5 M parameters would need 9 TB);
* ``laplace-full-small``: ``hessian_structure="full"`` over all weights of a narrow FCNN 784-4-10 (3,190
  parameters), the largest full GGN that fits next to the other workers on a shared machine;
* ``ggn-vp``: one dataset-level GGN-vector product ``full_operator(curv, "ggn", data=loader) @ v`` against
  curvlinops' ``GGNLinearOperator(model, loss, params, loader) @ v`` on the same loader.

Writes ``bench/RESULTS-dataset.md`` and ``bench/RESULTS-dataset.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def fcnn() -> nn.Module:
    """The paper's FCNN on Fashion-MNIST (``examples/models/fcnn_fashion_mnist.py``)."""
    spec = importlib.util.spec_from_file_location("fcnn_model", ROOT / "examples/models/fcnn_fashion_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_model()


def narrow_fcnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 4), nn.Sigmoid(), nn.Linear(4, 10))


def loader(samples: int, batch_size: int) -> DataLoader:
    from hbpc.data import load_fashion_mnist

    data = load_fashion_mnist(split="train")
    dataset = TensorDataset(data.images[:samples], data.labels[:samples])
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def laplace_backends() -> dict:
    from laplace.curvature import AsdlGGN, BackPackGGN, CurvlinopsGGN

    from hbpc.laplace import HBPCGGN

    return {"hbpc": HBPCGGN, "curvlinops": CurvlinopsGGN, "backpack": BackPackGGN, "asdl": AsdlGGN}


def laplace_fit(build, data, structure: str, subset: str, backend):
    """``() -> (seconds, log marginal likelihood at prior precision 1)`` of one fresh fit."""
    from laplace import Laplace

    def run():
        model = build()
        la = Laplace(model, "classification", subset_of_weights=subset, hessian_structure=structure, backend=backend)
        start = time.perf_counter()
        la.fit(data)
        seconds = time.perf_counter() - start
        return seconds, float(la.log_marginal_likelihood(torch.tensor(1.0)))

    return run


def ggn_vp(data, implementation: str):
    """``() -> (seconds, G v)`` of one dataset-level GGN-vector product (the setup is not timed)."""
    model = fcnn()
    params = [p for p in model.parameters()]
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    if implementation == "hbpc":
        import hbpc
        from hbpc.linalg import full_operator

        module = hbpc.compile_model(model, next(iter(data))[0][:2], nn.CrossEntropyLoss())
        G = full_operator(module.Curvature(model), "ggn", data=data)

        def product():
            return G.matvec(v)
    else:
        from curvlinops import GGNLinearOperator

        G = GGNLinearOperator(model, nn.CrossEntropyLoss(), params, data, check_deterministic=False)

        def product():
            return G @ v

    def run():
        start = time.perf_counter()
        out = product()
        return time.perf_counter() - start, torch.cat([t.reshape(-1) for t in out])

    return run


def relative(a, b) -> float:
    if isinstance(a, torch.Tensor):
        return float((a - b).norm() / b.norm())
    return abs(a - b) / abs(b)


def measure(row: str, runs: dict, rounds: int, log) -> list[dict]:
    """Interleave ``runs`` (``{impl: () -> (seconds, value)}``) for ``rounds`` rounds; value check against hbpc."""
    times = {impl: [] for impl in runs}
    values, errors = {}, {}
    for round_ in range(rounds):
        for impl, run in runs.items():
            if impl in errors:
                continue
            try:
                seconds, value = run()
            except Exception as error:  # a peer that fails is a table cell, not a crashed benchmark
                errors[impl] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                log(f"  {row} {impl}: {errors[impl]}")
                continue
            times[impl].append(seconds)
            values.setdefault(impl, value)
            log(f"  {row} {impl} round {round_}: {seconds:.2f} s")
    records = []
    for impl in runs:
        record = {"row": row, "impl": impl}
        if impl in errors:
            record["error"] = errors[impl]
        else:
            record["seconds"] = statistics.median(times[impl])
            record["all_seconds"] = times[impl]
            if "hbpc" in values and impl != "hbpc":
                record["relative_difference"] = relative(values[impl], values["hbpc"])
        records.append(record)
    return records


def render(records: list[dict], args, meta: dict) -> str:
    lines = [
        "# Dataset-level curvature and laplace-torch backends (`python -m bench.dataset`)",
        "",
        f"Fashion-MNIST, the first {args.samples} training images ({args.small_samples} for laplace-full-small) "
        f"in batches of {args.batch_size}, float32, "
        f"{meta['threads']} threads on `{meta['machine']}` (shared: load average {meta['load']} at the start). "
        f"Median of the rounds listed, implementations interleaved within each round; "
        "`rel. diff.` is the peer's value against hbpc's (log marginal likelihood at prior precision 1, or the "
        "product's relative 2-norm difference).",
        "",
        "| row | implementation | seconds (median) | all rounds | × hbpc | rel. diff. | run |",
        "|---|---|---|---|---|---|---|",
    ]
    fastest = {}
    for record in records:
        hbpc = next((r for r in records if r["row"] == record["row"] and r["impl"] == "hbpc"), None)
        if "error" in record:
            lines.append(f"| {record['row']} | {record['impl']} | failed: {record['error']} | | | | |")
            continue
        ratio = record["seconds"] / hbpc["seconds"] if hbpc and "seconds" in hbpc else float("nan")
        rounds = ", ".join(f"{s:.2f}" for s in record["all_seconds"])
        diff = f"{record['relative_difference']:.1e}" if "relative_difference" in record else ""
        lines.append(f"| {record['row']} | {record['impl']} | {record['seconds']:.2f} | {rounds} | {ratio:.2f} | {diff} "
                     f"| {record.get('run', '')} |")
        best = fastest.get(record["row"])
        if best is None or record["seconds"] < best[1]:
            fastest[record["row"]] = (record["impl"], record["seconds"])
    lines += ["", "Fastest per row: " + ", ".join(f"{row}: {impl}" for row, (impl, _) in fastest.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--row-rounds", nargs="*", default=[], metavar="ROW=K",
                        help="rounds for single rows, e.g. laplace-kron=1 (its fits take minutes)")
    parser.add_argument("--small-samples", type=int, default=2_000,
                        help="images for laplace-full-small (its dense products cost P = 3,190 vectors per batch)")
    parser.add_argument("--rows", nargs="+", default=["laplace-kron", "laplace-full-last-layer", "laplace-full-small",
                                                      "ggn-vp"])
    parser.add_argument("--backends", nargs="+", default=["hbpc", "curvlinops", "backpack", "asdl"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-dataset.md")
    parser.add_argument("--keep", action="store_true", help="keep the records of rows not in --rows from the JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    data = loader(args.samples, args.batch_size)
    backends = {name: cls for name, cls in laplace_backends().items() if name in args.backends}
    meta = {"threads": args.threads, "machine": platform.machine() + " " + platform.processor(),
            "load": ", ".join(f"{x:.1f}" for x in os.getloadavg()), "torch": torch.__version__,
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    records = []
    rows = {
        "laplace-kron": lambda: {n: laplace_fit(fcnn, data, "kron", "all", b) for n, b in backends.items()},
        "laplace-full-last-layer": lambda: {n: laplace_fit(fcnn, data, "full", "last_layer", b)
                                            for n, b in backends.items()},
        "laplace-full-small": lambda: {n: laplace_fit(narrow_fcnn, loader(args.small_samples, args.batch_size),
                                                      "full", "all", b) for n, b in backends.items()},
        "ggn-vp": lambda: {n: ggn_vp(data, n) for n in ("hbpc", "curvlinops")},
    }
    row_rounds = {row: int(k) for row, k in (item.split("=") for item in args.row_rounds)}
    saved = args.out.with_suffix(".json")
    if args.keep and saved.exists():  # rows not rerun keep their records (and say which run they come from)
        records = [r for r in json.loads(saved.read_text())["records"] if r["row"] not in args.rows]
    for row in args.rows:
        print(f"{row}:", flush=True)
        records += [{**r, "run": meta["started"]}
                    for r in measure(row, rows[row](), row_rounds.get(row, args.rounds), lambda l: print(l, flush=True))]

    text = render(records, args, meta)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
