#!/usr/bin/env python
"""What fundl's MLP step costs beside stax's: an interleaved A/B of step variants.

    python scripts/bench_mlp_step.py [--model mlp] [--rounds 41]

Variants, each jitted with the state donated, on one batch on the device
(``scripts/benchmark.py``'s model, batch and Adam): ``stax``; ``fundl``
(``make_train_step``: loss and accuracy, ``TrainState`` with step counter and
key); ``fundl_loss_only`` (``metrics_fn=no_metrics``); ``fundl_tuple`` (fundl's
model in a stax-style step: a ``(params, opt_state)`` tuple, loss only).
Rounds of ~0.3 s per variant, the order rotated each round; reported: median
steps/s and the median per-round ratio to stax.  docs/benchmarks.md quotes it.
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


def variants(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import benchmark as bench
    from fundl.metrics import no_metrics
    from fundl.train.state import create_train_state
    from fundl.train.step import make_train_step

    x, y = (jnp.asarray(a) for a in bench._data(spec))
    shape = (bench.BATCH,) + tuple(spec["x"])

    def fundl(**kwargs):
        model, opt = bench.fundl_model(spec), optax.adam(bench.LR)
        state = create_train_state(model, opt, 0, shape)
        step = jax.jit(make_train_step(model, opt, **kwargs), donate_argnums=0)
        return bench._jax_runner(lambda s, x, y: step(s, {"x": x, "y": y}), state, x, y)

    def fundl_tuple():
        model, opt = bench.fundl_model(spec), optax.adam(bench.LR)
        params, model_state, _ = model.init(jax.random.key(0), shape)

        def step(state, x, y):
            params, opt_state = state
            loss, grads = jax.value_and_grad(
                lambda p: bench._ce(model.apply(p, model_state, x, train=True)[0], y))(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        return bench._jax_runner(jax.jit(step, donate_argnums=0), (params, opt.init(params)), x, y)

    return {"stax": bench.build_stax(spec), "fundl": fundl(), "fundl_loss_only": fundl(metrics_fn=no_metrics),
            "fundl_tuple": fundl_tuple()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp", choices=["mlp", "mlp1d"])
    p.add_argument("--rounds", type=int, default=41)
    args = p.parse_args(argv)
    import benchmark as bench

    runners = variants(bench.SPECS[args.model])
    for r in runners.values():
        r.run(20)
    names, rates = list(runners), {k: [] for k in runners}
    for rnd in range(args.rounds):
        for k in names[rnd % len(names):] + names[:rnd % len(names)]:
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.3:
                runners[k].run(10)
                n += 10
            rates[k].append(n / (time.perf_counter() - t0))
    for k, v in rates.items():
        ratio = statistics.median(a / b for a, b in zip(v, rates["stax"]))
        print(f"{args.model} {k:16s} {statistics.median(v):8.0f} steps/s  x stax {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
