#!/usr/bin/env python
"""Device-resident data against NumPy batches, in the hand-written loop of a config's model.

    python scripts/bench_device_data.py --configs mnist1d_paper_cnn,mnist1d_cnn,mnist_mlp [--steps 1500] [--rounds 7]

DESIGN.md: "Small datasets can live on the device ... measure it against the host
loader".  Per config, two loops over the same shuffled order, in interleaved
rounds: **host** — each batch gathered with NumPy and passed to the jitted,
donated step (``bench_end_to_end.py``'s hand loop); **device** — the training
arrays put on the device once, and the step given the batch's example indices,
gathering them inside the compiled step.  Reports microseconds per step and
the median of the per-round ratio host time / device time (> 1: the device
gather wins).  docs/benchmarks.md quotes the result.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def loops(config: dict):
    """(host loop, device loop): each ``run(n) -> seconds`` for n steps from the initial state."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import bench_end_to_end as e2e

    data, loader, state0, step = e2e._setup(config)
    x, y, b = data.train["x"], data.train["y"], loader.batch_size
    host_step = jax.jit(step, donate_argnums=0)
    device_step = jax.jit(lambda s, arrays, ids: step(s, {k: jnp.take(v, ids, axis=0) for k, v in arrays.items()}),
                          donate_argnums=0)
    on_device = jax.device_put({"x": x, "y": y})
    order = np.random.default_rng(0).permutation(len(y)).astype(np.int32)
    per_epoch = len(y) // b

    def run(n, device):
        s = jax.device_put(state0, may_alias=False)
        t = time.perf_counter()
        for i in range(n):
            ids = order[(i % per_epoch) * b:(i % per_epoch + 1) * b]
            s, m = device_step(s, on_device, ids) if device else host_step(s, {"x": x[ids], "y": y[ids]})
            if (i + 1) % 100 == 0:
                float(m["loss"])  # the hand loop's loss fetch
        jax.block_until_ready(s)
        return time.perf_counter() - t

    return (lambda n: run(n, False)), (lambda n: run(n, True))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="mnist1d_paper_cnn,mnist1d_cnn,mnist_mlp")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    from fundl import config as cfg

    for name in args.configs.split(","):
        host, device = loops(cfg.load_config(ROOT / "configs" / f"{name}.toml"))
        host(50), device(50)  # compile and warm up
        times = {"host": [], "device": []}
        for r in range(args.rounds):
            pair = (("host", host), ("device", device))
            for k, run in pair if r % 2 == 0 else pair[::-1]:
                times[k].append(run(args.steps))
        ratio = statistics.median(h / d for h, d in zip(times["host"], times["device"]))
        print(f"{name}: host {statistics.median(times['host']) / args.steps * 1e6:.1f} us/step, device "
              f"{statistics.median(times['device']) / args.steps * 1e6:.1f} us/step, host time / device time "
              f"{ratio:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
