"""Loader throughput, alone and next to an MLP training step.

Prints examples/s for: the loader alone (prefetch off / on / on + jax.device_put),
a jitted MLP train step alone (784-512-512-10, Adam; plain JAX so it measures
compute, not our API), and the two together, so the ratio "loader speed / step
speed" in the data issue can be re-measured on any machine.  docs/data.md records the runs.

    python -m benchmarks.bench_loader [--batch-size 128] [--examples 60000] [--epochs 3]
"""

from __future__ import annotations

import sys
import time

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

import numpy as np

from benchmarks import harness
from fundl.data import Loader


def time_loader(arrays, batch_size, epochs, **kwargs) -> float:
    """Examples per second to iterate ``epochs`` epochs (the first batch's thread start-up included)."""
    loader = Loader(arrays, batch_size, seed=0, drop_last=True, **kwargs)
    n = 0
    start = time.perf_counter()
    for e in range(epochs):
        for batch in loader.epoch(e):
            n += len(batch["y"])
    if kwargs.get("device_put"):
        batch["x"].block_until_ready()
    return n / (time.perf_counter() - start)


def make_mlp_step(batch_size):
    import jax
    import jax.numpy as jnp
    import optax

    sizes = [784, 512, 512, 10]
    keys = jax.random.split(jax.random.key(0), len(sizes) - 1)
    params = [(jax.random.normal(k, (a, b)) * (1 / a) ** 0.5, jnp.zeros(b)) for k, a, b in zip(keys, sizes, sizes[1:])]
    opt = optax.adam(1e-3)

    def loss_fn(params, x, y):
        h = x.reshape(x.shape[0], -1)
        for w, b in params[:-1]:
            h = jax.nn.relu(h @ w + b)
        logits = h @ params[-1][0] + params[-1][1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, batch["x"], batch["y"])
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step, (params, opt.init(params))


def time_step(step, state, batch, iters) -> float:
    state, loss = step(state, batch)  # compile
    loss.block_until_ready()
    start = time.perf_counter()
    for _ in range(iters):
        state, loss = step(state, batch)
    loss.block_until_ready()
    return iters * len(batch["y"]) / (time.perf_counter() - start)


def time_training(step, state, arrays, batch_size, epochs, prefetch) -> float:
    loader = Loader(arrays, batch_size, seed=0, drop_last=True, prefetch=prefetch, device_put=True)
    state, loss = step(state, next(iter(loader.epoch(0))))
    loss.block_until_ready()
    n, start = 0, time.perf_counter()
    for e in range(epochs):
        for batch in loader.epoch(e):
            state, loss = step(state, batch)
            n += batch_size
    loss.block_until_ready()
    return n / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = harness.parser(__doc__, __spec__.name)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--examples", type=int, default=60000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--no-step", action="store_true", help="measure the loader only")
    args = p.parse_args(argv)

    started = harness.start()
    rng = np.random.default_rng(0)
    arrays = {"x": rng.random((args.examples, 28, 28, 1), dtype=np.float32),
              "y": rng.integers(0, 10, args.examples).astype(np.int32)}
    b, e = args.batch_size, args.epochs
    rows = [("loader, prefetch=0", time_loader(arrays, b, e, prefetch=0)),
            ("loader, prefetch=2", time_loader(arrays, b, e, prefetch=2))]
    if not args.no_step:
        rows.append(("loader, prefetch=2 + jax.device_put", time_loader(arrays, b, e, prefetch=2, device_put=True)))
        step, state = make_mlp_step(b)
        batch = Loader(arrays, b, seed=0, prefetch=0).batch(0, 0)
        step_speed = time_step(step, state, batch, iters=200)
        rows.append(("MLP 784-512-512-10 Adam step alone (same batch)", step_speed))
        rows.append(("loader + step, prefetch=0", time_training(step, state, arrays, b, 1, 0)))
        rows.append(("loader + step, prefetch=2", time_training(step, state, arrays, b, 1, 2)))
    print(f"MNIST-shaped float32 data: {args.examples} x 28 x 28 x 1, batch {b}, {e} epochs, shuffled; "
          + harness.header(harness.finish(started, __spec__.name, argv)))
    print(harness.markdown_table(["what", "examples/s"], [[name, f"{speed:,.0f}"] for name, speed in rows], "lr"))
    if not args.no_step:
        print(f"loader alone (prefetch=0) / step alone: {rows[0][1] / step_speed:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
