#!/usr/bin/env python
"""Device-resident data against NumPy batches, in the hand-written loop of a config's model.

    python scripts/bench_device_data.py --configs mnist1d_paper_cnn,mnist1d_cnn,mnist_mlp [--steps 1500] [--rounds 7]

DESIGN.md: "Small datasets can live on the device ... measure it against the
host loader".  Per config, ``bench_end_to_end.py``'s hand loop two ways over the
same shuffled order, in interleaved rounds: **host** — each batch gathered with
NumPy and passed to the jitted, donated step; **device** (``time_hand(...,
device_data=True)``) — the training arrays put on the device once, and the step
given the batch's example indices, gathering them inside the compiled step.
Reports microseconds per step and the median of the per-round ratio host time /
device time (> 1: the device gather wins).  docs/benchmarks.md quotes the result.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="mnist1d_paper_cnn,mnist1d_cnn,mnist_mlp")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    import bench_end_to_end as e2e
    from fundl.run import config as cfg

    for name in args.configs.split(","):
        config = cfg.load_config(ROOT / "configs" / f"{name}.toml")
        times = {"host": [], "device": []}
        for r in range(args.rounds):  # each call builds and warms up its step before timing
            for k in ("host", "device") if r % 2 == 0 else ("device", "host"):
                times[k].append(e2e.time_hand(config, args.steps, device_data=k == "device"))
        ratio = statistics.median(h / d for h, d in zip(times["host"], times["device"]))
        print(f"{name}: host {statistics.median(times['host']) / args.steps * 1e6:.1f} us/step, device "
              f"{statistics.median(times['device']) / args.steps * 1e6:.1f} us/step, host time / device time "
              f"{ratio:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
