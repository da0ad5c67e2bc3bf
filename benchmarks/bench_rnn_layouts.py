"""Measure LSTM/GRU matmul layouts for a scan-based training step.

Usage:  python -m benchmarks.bench_rnn_layouts [--batch 128] [--steps 28] [--hidden 128]
            [--features 28] [--repeats 7] [--iters 20] [--cells lstm,gru]

For each cell and layout a full training step is timed: ``value_and_grad`` of
a cross-entropy loss (RNN over the sequence, dense readout of the last hidden
state to 10 classes) plus an ``optax.adam`` update, jitted, buffers reused.
Every variant is compiled and warmed up (3 calls) first; then ``--repeats``
rounds each time ``--iters`` steps of every variant in turn (``harness.interleaved``:
the order rotated each round, so load changes hit all variants alike), blocking on
the result; the median over rounds is reported as training steps per second.
Figures are comparable only on an otherwise idle machine: the load average is printed.

Layouts (all compute the same function):
  fused     one ``concat([x_t, h]) @ W`` per step, W of shape (F+H, G*H)
  separate  ``x_t @ W_ih + h @ W_hh`` per step inside the scan
  hoisted   ``x @ W_ih`` for all steps before the scan, ``h @ W_hh`` inside
each with ``unroll`` in {1, 2, 4}.  The last rows time ``fundl.nn.lstm``/``gru``
with their default settings, so the library's choice is measured too.
docs/benchmarks.md ("LSTM") records the runs; ``fundl.nn``'s recurrent layers follow them.

``--forward`` times the recurrent forward pass alone (``jit(run)``) instead of
the training step; ``--hlo`` prints, per variant, how many loop fusions of the
compiled program XLA:CPU splits into parallel tasks
(``outer_dimension_partitions`` in the optimised HLO), the measurement behind
docs/benchmarks.md's "LSTM: where the hoisted input projection loses" (run it
also under ``taskset -c 0`` and with ``XLA_FLAGS=--xla_cpu_use_fusion_emitters=false``).
"""

import re
import sys
import time

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import harness


def lstm_gates(z, c):
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return h, c


def make_lstm(layout, unroll, F, H):
    def init(key):
        k1, k2 = jax.random.split(key)
        b = 1 / np.sqrt(H)
        w_ih = jax.random.uniform(k1, (F, 4 * H), minval=-b, maxval=b)
        w_hh = jax.random.uniform(k2, (H, 4 * H), minval=-b, maxval=b)
        bias = jnp.zeros((4 * H,))
        if layout == "fused":
            return {"w": jnp.concatenate([w_ih, w_hh]), "b": bias}
        return {"w_ih": w_ih, "w_hh": w_hh, "b": bias}

    def run(p, xs):  # xs: (T, B, F) -> last h (B, H)
        B = xs.shape[1]
        carry = (jnp.zeros((B, H)), jnp.zeros((B, H)))
        if layout == "fused":
            def step(carry, x):
                h, c = carry
                z = jnp.concatenate([x, h], -1) @ p["w"] + p["b"]
                h, c = lstm_gates(z, c)
                return (h, c), None
            seq = xs
        elif layout == "separate":
            def step(carry, x):
                h, c = carry
                z = x @ p["w_ih"] + h @ p["w_hh"] + p["b"]
                h, c = lstm_gates(z, c)
                return (h, c), None
            seq = xs
        else:  # hoisted
            def step(carry, zx):
                h, c = carry
                h, c = lstm_gates(zx + h @ p["w_hh"], c)
                return (h, c), None
            seq = xs @ p["w_ih"] + p["b"]
        (h, _), _ = jax.lax.scan(step, carry, seq, unroll=unroll)
        return h

    return init, run


def make_gru(layout, unroll, F, H):
    # torch GRU: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); the hidden
    # projection of n cannot be fused with the input one, so "fused" means
    # concat([x, h]) @ W for the r, z gates plus separate n projections.
    def init(key):
        k1, k2 = jax.random.split(key)
        b = 1 / np.sqrt(H)
        w_ih = jax.random.uniform(k1, (F, 3 * H), minval=-b, maxval=b)
        w_hh = jax.random.uniform(k2, (H, 3 * H), minval=-b, maxval=b)
        return {"w_ih": w_ih, "w_hh": w_hh, "b_ih": jnp.zeros(3 * H), "b_hh": jnp.zeros(3 * H)}

    def cell(h, zx, zh):
        xr, xz, xn = jnp.split(zx, 3, -1)
        hr, hz, hn = jnp.split(zh, 3, -1)
        r = jax.nn.sigmoid(xr + hr)
        z = jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        return (1 - z) * n + z * h

    def run(p, xs):
        B = xs.shape[1]
        h0 = jnp.zeros((B, H))
        if layout == "fused":
            # one matmul per step: block matrix [[W_ih, 0], [0, W_hh]] over [x, h]
            # is wasteful; instead concat and use [[W_ir|W_iz, W_in, 0], [W_hr|W_hz, 0, W_hn]]
            w = jnp.concatenate([
                jnp.concatenate([p["w_ih"][:, :2 * H], p["w_ih"][:, 2 * H:], jnp.zeros((F, H))], 1),
                jnp.concatenate([p["w_hh"][:, :2 * H], jnp.zeros((H, H)), p["w_hh"][:, 2 * H:]], 1),
            ], 0)  # (F+H, 4H): [r|z summed, n_x, n_h]
            b = jnp.concatenate([p["b_ih"][:2 * H] + p["b_hh"][:2 * H], p["b_ih"][2 * H:], p["b_hh"][2 * H:]])

            def step(h, x):
                zz = jnp.concatenate([x, h], -1) @ w + b
                rz, xn, hn = zz[:, :2 * H], zz[:, 2 * H:3 * H], zz[:, 3 * H:]
                r, z = jnp.split(jax.nn.sigmoid(rz), 2, -1)
                n = jnp.tanh(xn + r * hn)
                return (1 - z) * n + z * h, None
            seq = xs
        elif layout == "separate":
            def step(h, x):
                return cell(h, x @ p["w_ih"] + p["b_ih"], h @ p["w_hh"] + p["b_hh"]), None
            seq = xs
        else:
            def step(h, zx):
                return cell(h, zx, h @ p["w_hh"] + p["b_hh"]), None
            seq = xs @ p["w_ih"] + p["b_ih"]
        h, _ = jax.lax.scan(step, h0, seq, unroll=unroll)
        return h

    return init, run


def make_fundl(cell_name, F, H):
    from fundl import nn

    layer = (nn.lstm if cell_name == "lstm" else nn.gru)(
        H, time_major=True, return_sequences=False, return_carry=True)
    def init(key):
        p, _, _ = layer.init(key, (28, 2, F))
        return p

    def run(p, xs):
        carry, _ = layer.apply(p, {}, xs)
        return carry[0] if cell_name == "lstm" else carry

    return init, run


def make_step(init, run, args, H):
    """A compiled, warmed-up training step and a function timing ``n`` calls of it."""
    key = jax.random.key(0)
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"rnn": init(k1), "head": {
        "w": jax.random.normal(k2, (H, 10)) / np.sqrt(H), "b": jnp.zeros(10)}}
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)
    xs = jax.random.normal(k3, (args.steps, args.batch, args.features))
    ys = jax.random.randint(k3, (args.batch,), 0, 10)

    if args.forward:  # the recurrent forward pass alone
        forward = jax.jit(run)
        rnn_params = params["rnn"]
        if args.hlo:
            hlo = forward.lower(rnn_params, xs).compile().as_text()
            split = re.findall(r'kind=kLoop[^\n]*outer_dimension_partitions":\["([0-9]+)"\]', hlo)
            print(f"  HLO: {sum(int(n) > 1 for n in split)} loop fusions split into parallel tasks")
        jax.block_until_ready(forward(rnn_params, xs))

        def timed_forward(n):
            t0 = time.perf_counter()
            for _ in range(n):
                out = forward(rnn_params, xs)
            jax.block_until_ready(out)
            return n / (time.perf_counter() - t0)

        return timed_forward

    def loss_fn(p):
        h = run(p["rnn"], xs)
        logits = h @ p["head"]["w"] + p["head"]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()

    @jax.jit
    def train_step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    box = [params, opt_state]
    for _ in range(3):
        box[0], box[1], loss = train_step(*box)
    jax.block_until_ready(loss)

    def timed(n):
        t0 = time.perf_counter()
        for _ in range(n):
            box[0], box[1], loss = train_step(*box)
        jax.block_until_ready(loss)
        return n / (time.perf_counter() - t0)

    return timed


def main(argv=None) -> int:
    ap = harness.parser(__doc__, __spec__.name)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--features", type=int, default=28)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds (the median is reported)")
    ap.add_argument("--iters", type=int, default=20, help="timed steps per variant per round")
    ap.add_argument("--cells", default="lstm,gru")
    ap.add_argument("--layouts", default="fused,separate,hoisted")
    ap.add_argument("--unrolls", default="1,2,4")
    ap.add_argument("--no-fundl", action="store_true", help="skip timing fundl's own layers")
    ap.add_argument("--forward", action="store_true", help="time the recurrent forward pass alone, not a train step")
    ap.add_argument("--hlo", action="store_true", help="with --forward: count loop fusions split into parallel tasks")
    args = ap.parse_args(argv)
    F, H = args.features, args.hidden
    started = harness.start()
    # Compile every variant first, then time them in interleaved rounds, so
    # that a change in machine load affects all variants alike.
    variants = {}
    for cell in harness.names(args.cells):
        make = make_lstm if cell == "lstm" else make_gru
        for layout in harness.names(args.layouts):
            for unroll in map(int, harness.names(args.unrolls)):
                if args.hlo:
                    print(f"{cell} {layout} unroll {unroll}:")
                variants[(cell, layout, str(unroll))] = make_step(*make(layout, unroll, F, H), args, H)
        if not args.no_fundl:
            variants[(cell, "fundl", "dflt")] = make_step(*make_fundl(cell, F, H), args, H)
    rates = harness.interleaved({k: (lambda timed=timed: timed(args.iters)) for k, timed in variants.items()},
                                args.repeats)
    record = harness.finish(started, __spec__.name, argv)
    print(f"{jax.devices()[0].platform}; batch {args.batch}, T {args.steps}, F {F}, H {H}; adam; median of "
          f"{args.repeats} rounds x {args.iters} {'calls' if args.forward else 'steps'}; " + harness.header(record))
    unit = "calls/s" if args.forward else "steps/s"
    rows = [[cell, layout, unroll, *(f"{v:.1f}" for v in harness.spread(r).values())]
            for (cell, layout, unroll), r in rates.items()]
    print(harness.markdown_table(["cell", "layout", "unroll", unit, "min", "max"], rows, "lllrrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
