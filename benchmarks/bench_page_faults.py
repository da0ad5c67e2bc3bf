"""Page faults per training step, with and without glibc's huge-page tunable.

    python -m benchmarks.bench_page_faults [--models cnn,lstm,mlp] [--pairs 2] [--steps 30] [--seconds 2]

XLA:CPU allocates each step's temporary buffer afresh and frees it after the
step; glibc maps a buffer that large anew every time, so each step faults its
pages in again (fundl/run/hugepages.py).  This runs fundl's benchmark step
(``benchmarks.peers``' models, batch 128) in fresh processes, alternating
``FUNDL_HUGEPAGES=0`` (the process as Python starts it) and the default (the
scripts' re-exec with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``), and prints
per model: minor page faults per step, steps/s (each step synchronised), the
ratio of the two and XLA's temporary buffer size.  Alternating processes (the
order rotated per pair) keep drift in the machine's load from favouring either
side.  docs/benchmarks.md, "Page faults", records the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

from benchmarks import harness
from benchmarks.peers import SPECS, build

SETTINGS = {"4 KiB pages (FUNDL_HUGEPAGES=0)": "0", "huge pages (default)": "1"}


def measure(models: list[str], steps: int, seconds: float) -> dict:
    """In this process: faults/step and steps/s of fundl's benchmark step, per model (>= steps, >= seconds)."""
    import resource
    import time

    out = {}
    for name in models:
        runner = build("fundl", SPECS[name], name, 1)
        runner.run(5)  # compile and warm up
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        done = 0
        while done < steps or time.perf_counter() - t0 < seconds:
            runner.run(1)
            done += 1
        elapsed = time.perf_counter() - t0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        out[name] = {"faults_per_step": faults / done, "steps_per_s": done / elapsed,
                     "xla_temp_mib": (runner.xla_memory_bytes() or 0) / 2**20}
    out["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    return out


def main(argv=None) -> int:
    p = harness.parser(__doc__, __spec__.name)
    p.add_argument("--models", default="cnn,lstm,mlp", help="comma-separated, from benchmarks.peers.SPECS")
    p.add_argument("--pairs", type=int, default=2, help="alternating pairs of processes")
    p.add_argument("--steps", type=int, default=30, help="timed steps per process and model, at least")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per process and model, at least")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    models = harness.names(args.models)
    unknown = [m for m in models if m not in SPECS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {sorted(SPECS)}")
    if args.child:
        print(json.dumps(measure(models, args.steps, args.seconds)))
        return 0

    started = harness.start()
    child_args = ["--child", "--models", ",".join(models), "--steps", args.steps, "--seconds", args.seconds]

    def child(flag):
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        env["FUNDL_HUGEPAGES"] = flag
        done = harness.run_module(__spec__.name, child_args, env=env, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    runs = harness.interleaved({label: (lambda f=flag: child(f)) for label, flag in SETTINGS.items()}, args.pairs)
    small, huge = (runs[label] for label in SETTINGS)
    record = harness.finish(started, __spec__.name, argv)
    print(f"GLIBC_TUNABLES seen: {small[0]['glibc_tunables']!r} / {huge[0]['glibc_tunables']!r}; "
          f"{args.pairs} alternating pairs of processes, at least {args.steps} synchronised steps and "
          f"{args.seconds} s per model each")
    print(harness.header(record))

    def med(rs, m, key):
        return statistics.median(r[m][key] for r in rs)

    rows = [[m, f"{huge[0][m]['xla_temp_mib']:.1f}", f"{med(small, m, 'faults_per_step'):.0f}",
             f"{med(huge, m, 'faults_per_step'):.0f}", f"{med(small, m, 'steps_per_s'):.1f}",
             f"{med(huge, m, 'steps_per_s'):.1f}",
             f"{harness.median_ratio([h[m]['steps_per_s'] for h in huge], [s[m]['steps_per_s'] for s in small]):.2f}"]
            for m in models]
    print(harness.markdown_table(["model", "XLA temp MiB", "faults/step, 4 KiB", "faults/step, huge",
                                  "steps/s, 4 KiB", "steps/s, huge", "huge / 4 KiB"], rows, "lrrrrrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
