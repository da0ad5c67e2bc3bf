"""Throughput of the data-parallel placements against the single-device step, in one run.

    python -m benchmarks.bench_parallel [--local-devices 4] [--model mlp|cnn] [--batch 256] [--steps 30]

Every placement trains the same model at the same *global* batch: the
single-device ``jax.jit`` step, then ``pmap`` and sharded ``jit`` on 1, 2,
4, ... of the local devices.  Each timing includes what the loop pays per
step: the host batch split and sent to the devices, the step, and the
periodic host sync (``placement.sync_every``).  Rounds are interleaved
(``harness.interleaved``) and the median is reported, with each placement's
median per-round ratio to the single device.

On a CPU the "devices" are fake (``--local-devices``, the default here: 4)
and share the same cores, so the figures show the overhead of each path,
not a speed-up.  On a machine with several accelerators, pass
``--local-devices 0`` to use the real ones.  docs/parallel.md records the runs.
"""

from __future__ import annotations

import statistics
import sys
import time

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

from benchmarks import harness


def main(argv=None) -> int:
    p = harness.parser(__doc__, __spec__.name)
    p.add_argument("--local-devices", type=int, default=4, help="fake CPU devices (0: the platform's own devices)")
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--batch", type=int, default=256, help="global batch size")
    p.add_argument("--steps", type=int, default=30, help="timed steps per round")
    harness.add_rounds(p, 3)
    args = p.parse_args(argv)

    import jax

    if args.local_devices:
        jax.config.update("jax_num_cpu_devices", args.local_devices)
    import numpy as np
    import optax

    from fundl import models
    from fundl.train.placement import make_placement, single_device
    from fundl.train.state import create_train_state
    from fundl.train.step import make_train_step

    n = jax.local_device_count()
    counts = [c for c in (1, 2, 4, 8, 16) if c <= n and args.batch % c == 0]
    shape = (784,) if args.model == "mlp" else (28, 28, 1)
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(args.batch,) + shape).astype(np.float32),
             "y": rng.integers(0, 10, args.batch).astype(np.int32)}

    def build(axis):
        if args.model == "mlp":
            return models.mlp([512, 512], 10)
        return models.cnn([32, 64], [256], 10, batch_norm=True, axis_name=axis)

    setups = [("single device (jit)", single_device())]
    setups += [(f"pmap, {c} device{'s' * (c > 1)}", make_placement("pmap", c)) for c in counts]
    setups += [(f"sharding, {c} device{'s' * (c > 1)}", make_placement("sharding", c)) for c in counts]
    runners = []
    for name, placement in setups:
        axis = getattr(placement, "axis_name", None)
        model = build(axis)
        opt = optax.adam(1e-3)
        state = placement.put_state(create_train_state(model, opt, jax.random.key(0), (1,) + shape))
        fn = placement.compile_train(make_train_step(model, opt, axis_name=axis), 1)
        runners.append([name, placement, fn, state])

    def run(r, steps):
        name, placement, fn, state = r
        t0 = time.perf_counter()
        metrics = None
        for i in range(steps):
            state, metrics = fn(state, placement.put_batch(batch))
            if placement.sync_every and (i + 1) % placement.sync_every == 0:
                jax.block_until_ready(metrics)
        jax.block_until_ready((state, metrics))
        r[3] = state
        return time.perf_counter() - t0

    for r in runners:  # compile and warm up
        run(r, 3)
    started = harness.start()
    rates = harness.interleaved({r[0]: (lambda r=r: args.steps * args.batch / run(r, args.steps)) for r in runners},
                                args.rounds)
    record = harness.finish(started, __spec__.name, argv)

    platform = jax.devices()[0].platform
    print(f"{args.model}, global batch {args.batch}, {args.steps} steps x {args.rounds} rounds, "
          f"{n} local {platform} devices; " + harness.header(record))
    single = rates[runners[0][0]]
    rows = [[name, f"{statistics.median(r):.0f}", f"{harness.median_ratio(r, single):.2f}x"]
            for name, r in rates.items()]
    print(harness.markdown_table(["placement", "examples/s", "vs single"], rows, "lrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
