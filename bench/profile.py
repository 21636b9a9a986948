"""Which generated function dominates? ``python -m bench.profile fcnn blocks-ggn [products-ggn ...]``.

Compiles the workload with hbpc, runs each quantity's phases a few times under cProfile and the
torch profiler, and prints the generated module's functions by cumulative time (their share of
the phase) and the top aten operators. Times are also given as multiples of one gradient.
"""
import argparse
import cProfile
import pstats
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("workload")
    parser.add_argument("quantities", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import profile

    torch.set_num_threads(args.threads)
    import hbpc
    from bench import impls
    from bench.workloads import WORKLOADS, random_batch

    workload = WORKLOADS[args.workload]
    model, example, loss_fn = workload.build()
    module = hbpc.compile_model(model, example, loss_fn)
    generated = module.__file__
    x, y = random_batch(example, workload.batch)

    def gradient():
        for p in model.parameters():
            p.grad = None
        loss_fn(model(x), y).backward()

    def median_time(fn, reps):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[reps // 2]

    g = median_time(gradient, 5)
    print(f"{workload.key} N={workload.batch}, {args.threads} threads: gradient {g * 1000:.1f} ms")
    for quantity in args.quantities:
        phases = impls.Hbpc(module).phases(quantity, model, x, y, loss_fn)
        for name, fn in phases.items():
            t = median_time(fn, args.reps)
            print(f"\n== {quantity} / {name}: {t * 1000:.1f} ms = {t / g:.2f}× gradient")
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.reps):
                fn()
            profiler.disable()
            stats = pstats.Stats(profiler).stats
            total = sum(v[3] for k, v in stats.items() if k[2] in ("run", "setup", "vector")
                        and k[0].endswith("impls.py")) or 1e-12
            rows = sorted(((v[3], k) for k, v in stats.items() if k[0] == generated), reverse=True)
            print(f"   {'cumulative':>10s} {'share':>6s} {'calls':>6s}  generated function")
            for cumulative, key in rows[: args.top]:
                calls = stats[key][1]
                print(f"   {cumulative / args.reps * 1000:8.1f}ms {cumulative / total:6.0%} {calls // args.reps:6d}  "
                      f"{key[2]} (line {key[1]})")
            with profile() as prof:
                fn()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    return 0


if __name__ == "__main__":
    sys.exit(main())
