#!/usr/bin/env python
"""Page faults per training step, with and without glibc's huge-page tunable.

    python scripts/bench_page_faults.py [--models cnn,lstm,mlp] [--pairs 2] [--steps 30] [--seconds 2]

XLA:CPU allocates each step's temporary buffer afresh and frees it after the
step; glibc maps a buffer that large anew every time, so each step faults its
pages in again (fundl/run/hugepages.py).  This runs fundl's benchmark step
(``scripts/benchmark.py``'s models, batch 128) in fresh processes, alternating
``FUNDL_HUGEPAGES=0`` (the process as Python starts it) and the default (the
scripts' re-exec with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``), and prints
per model: minor page faults per step, steps/s (each step synchronised), the
ratio of the two and XLA's temporary buffer size.  Alternating processes keep
drift in the machine's load from favouring either side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def measure(models: list[str], steps: int, seconds: float) -> dict:
    """In this process: faults/step and steps/s of fundl's benchmark step, per model (>= steps, >= seconds)."""
    import resource
    import time

    import benchmark as bm

    out = {}
    for name in models:
        runner = bm.build("fundl", bm.SPECS[name], name, 1)
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
                     "xla_temp_mib": (bm.xla_memory_bytes(runner) or 0) / 2**20}
    out["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cnn,lstm,mlp", help="comma-separated, from scripts/benchmark.py")
    p.add_argument("--pairs", type=int, default=2, help="alternating pairs of processes")
    p.add_argument("--steps", type=int, default=30, help="timed steps per process and model, at least")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per process and model, at least")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    import benchmark as bm
    unknown = [m for m in models if m not in bm.SPECS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {sorted(bm.SPECS)}")
    if args.child:
        print(json.dumps(measure(models, args.steps, args.seconds)))
        return 0

    runs = {"4 KiB pages (FUNDL_HUGEPAGES=0)": [], "huge pages (default)": []}
    for _ in range(args.pairs):
        for label, flag in zip(runs, ("0", "1")):
            env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
            env["FUNDL_HUGEPAGES"] = flag
            cmd = [sys.executable, __file__, "--child", "--models", ",".join(models), "--steps", str(args.steps),
                   "--seconds", str(args.seconds)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
    (small, huge) = runs.values()
    print(f"GLIBC_TUNABLES seen: {small[0]['glibc_tunables']!r} / {huge[0]['glibc_tunables']!r}; "
          f"{args.pairs} alternating pairs of processes, at least {args.steps} synchronised steps and "
          f"{args.seconds} s per model each")
    print("| model | XLA temp MiB | faults/step, 4 KiB | faults/step, huge | steps/s, 4 KiB | steps/s, huge "
          "| huge / 4 KiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    def med(rs, m, key):
        return statistics.median(r[m][key] for r in rs)

    for m in models:
        ratio = statistics.median(h[m]["steps_per_s"] / s[m]["steps_per_s"] for s, h in zip(small, huge))
        print(f"| {m} | {huge[0][m]['xla_temp_mib']:.1f} | {med(small, m, 'faults_per_step'):.0f} "
              f"| {med(huge, m, 'faults_per_step'):.0f} | {med(small, m, 'steps_per_s'):.1f} "
              f"| {med(huge, m, 'steps_per_s'):.1f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
