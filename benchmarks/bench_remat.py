"""Rematerialisation: XLA's memory analysis and step time, with and without it.

Usage:  python -m benchmarks.bench_remat [--iters 10] [--only mlp,lstm,unrolled]

Three studies, each a table printed as Markdown (docs/transforms.md records the runs):

* ``mlp``: a deep MLP (16 hidden layers of 1024, batch 256, 1024 inputs) --
  one training step (``make_train_step``, Adam): plain, ``models.mlp(remat=True)``
  (each hidden block recomputed, ``mode="custom_vjp"``), and the same blocks
  under ``jax.checkpoint`` (``mode="checkpoint"``).
* ``lstm``: a long-sequence LSTM classifier (T=512, batch 32, 16 features,
  2 layers of 128): plain, ``models.rnn_classifier(remat=True)`` (the cell's
  step checkpointed inside the time scan) and each layer under
  ``nn.remat`` (``jax.checkpoint`` around the whole scan).
* ``unrolled``: ``grad`` of a validation loss through K real training steps
  (``fundl.transforms.through_training.unrolled_training``; an MNIST-1D-sized
  MLP 40 -> 256 -> 256 -> 10, batch 128, Adam) for K = 10, 20, 40 with and
  without ``jax.checkpoint`` on the step (memory analysis only).

Memory: ``compiled_memory`` (``jit(...).lower(...).compile().memory_analysis()``):
``temp`` is XLA's scratch allocation, ``peak`` = temp + arguments + outputs
- aliased (donated) bytes.  Step time: the jitted step (state donated) is
compiled and warmed up, then ``--iters`` steps are timed one by one
(``block_until_ready``); the median is reported.  Shared machines make times
noisy: the load average is printed.
"""

import statistics
import sys
import time

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

import jax
import jax.numpy as jnp
import optax

from benchmarks import harness
from fundl import models, nn
from fundl.nn.remat import compiled_memory, remat, remat_serial
from fundl.train.state import create_train_state
from fundl.train.step import make_train_step
from fundl.transforms.through_training import unrolled_training, with_learning_rate

MiB = 2 ** 20


def step_row(name, model, input_shape, batch, num_classes, iters):
    """Memory analysis and median time of one jitted, donated training step."""
    opt = optax.adam(1e-3)
    state = create_train_state(model, opt, jax.random.key(0), (1,) + tuple(input_shape))
    kx, ky = jax.random.split(jax.random.key(1))
    data = {"x": jax.random.normal(kx, (batch,) + tuple(input_shape)),
            "y": jax.random.randint(ky, (batch,), 0, num_classes)}
    step = make_train_step(model, opt)
    mem = compiled_memory(step, state, data, donate_argnums=0)
    f = jax.jit(step, donate_argnums=0)
    t0 = time.perf_counter()
    state, m = f(state, data)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        state, m = f(state, data)
    jax.block_until_ready(m)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        state, m = f(state, data)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return {"variant": name, "temp": mem["temp"] / MiB, "peak": mem["peak"] / MiB,
            "ms": 1e3 * statistics.median(times), "compile_s": compile_s}


def deep_mlp_rows(iters, depth=16, width=1024, batch=256):
    blocks = lambda: [[nn.dense(width), nn.relu] for _ in range(depth)]
    checkpointed = remat_serial(nn.flatten(), *blocks(), nn.dense(10), name="mlp", mode="checkpoint")
    variants = [("plain", models.mlp([width] * depth, 10)),
                ("models.mlp(remat=True) (custom_vjp)", models.mlp([width] * depth, 10, remat=True)),
                ("blocks under jax.checkpoint", checkpointed)]
    return [step_row(n, m, (width,), batch, 10, iters) for n, m in variants]


def lstm_rows(iters, T=512, batch=32, features=16, hidden=128, layers=2):
    per_layer = nn.serial(nn.named("lstm", nn.stacked(*[remat(nn.lstm(hidden)) for _ in range(layers - 1)],
                                                      remat(nn.lstm(hidden, return_sequences=False)))),
                          nn.dense(10), name="rnn_classifier")
    variants = [("plain", models.rnn_classifier("lstm", hidden, 10, num_layers=layers)),
                ("rnn_classifier(remat=True) (cell step checkpointed)",
                 models.rnn_classifier("lstm", hidden, 10, num_layers=layers, remat=True)),
                ("each layer under nn.remat (jax.checkpoint)", per_layer)]
    return [step_row(n, m, (T, features), batch, 10, iters) for n, m in variants]


def unrolled_rows(ks=(10, 20, 40), batch=128):
    model = models.mlp([256, 256], 10)
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    state = create_train_state(model, opt, jax.random.key(0), (1, 40))
    step = make_train_step(model, opt)
    val = {"x": jnp.zeros((512, 40)), "y": jnp.zeros((512,), jnp.int32)}
    state_mib = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state))) / MiB
    rows = []
    for k in ks:
        batches = {"x": jax.ShapeDtypeStruct((k, batch, 40), jnp.float32),
                   "y": jax.ShapeDtypeStruct((k, batch), jnp.int32)}
        row = {"K": k}
        for r in (False, True):
            def f(log_lr, batches, r=r):
                trained, _ = unrolled_training(step, with_learning_rate(state, jnp.exp(log_lr)), batches, remat=r)
                out, _ = model.apply(trained.params, trained.model_state, val["x"])
                return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, val["y"]))
            row["remat" if r else "plain"] = compiled_memory(
                jax.grad(f), jax.ShapeDtypeStruct((), jnp.float32), batches)["temp"] / MiB
        rows.append(row)
    return rows, state_mib


def table(rows, cols):
    """A Markdown table of ``rows`` with ``cols``: ``[(heading, format(row) -> str), ...]``."""
    return harness.markdown_table([h for h, _ in cols], [[fmt(r) for _, fmt in cols] for r in rows],
                                  "l" + "r" * (len(cols) - 1))


def main(argv=None) -> int:
    p = harness.parser(__doc__, __spec__.name)
    p.add_argument("--iters", type=int, default=10, help="timed steps per variant (median reported)")
    p.add_argument("--only", default="mlp,lstm,unrolled", help="comma-separated studies to run")
    args = p.parse_args(argv)
    only = set(harness.names(args.only))
    started = harness.start()
    step_cols = [("variant", lambda r: r["variant"]), ("temp MiB", lambda r: f"{r['temp']:.1f}"),
                 ("peak MiB", lambda r: f"{r['peak']:.1f}"), ("step ms (median)", lambda r: f"{r['ms']:.1f}"),
                 ("compile s", lambda r: f"{r['compile_s']:.1f}")]
    if "mlp" in only:
        print("\nDeep MLP: 16 x 1024 relu, batch 256, 1024 inputs, one Adam step\n")
        print(table(deep_mlp_rows(args.iters), step_cols))
    if "lstm" in only:
        print("\nLSTM classifier: T=512, batch 32, 16 features, 2 layers of 128, one Adam step\n")
        print(table(lstm_rows(args.iters), step_cols))
    if "unrolled" in only:
        rows, state_mib = unrolled_rows()
        print(f"\ngrad through K Adam steps (MLP 40-256-256-10, batch 128): XLA temp MiB; "
              f"one train state (params + Adam moments) = {state_mib:.2f} MiB\n")
        print(table(rows, [("K", lambda r: str(r["K"])), ("plain", lambda r: f"{r['plain']:.1f}"),
                           ("remat", lambda r: f"{r['remat']:.1f}")]))
        (a, b) = rows[0], rows[-1]
        print(f"\nper extra step: plain {(b['plain'] - a['plain']) / (b['K'] - a['K']):.2f} MiB, "
              f"remat {(b['remat'] - a['remat']) / (b['K'] - a['K']):.2f} MiB")
    print(f"\n{jax.default_backend()}; " + harness.header(harness.finish(started, __spec__.name, argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
