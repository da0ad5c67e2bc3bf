"""Compile time of random draws, shaped (``jax.random`` as called) against flat and reshaped
(``fundl.nn.flat_random``, the same numbers): the trade behind that module.

    python -m benchmarks.bench_random_compile [--rounds 5] [--slot 0.5] [--only TEXT[,TEXT]] [--out DIR]

Rows: a dropout mask (``bernoulli``) and a normal draw of 960 elements at ranks 1 to 4; and
programs of fundl's that draw, built with each form (``flat_random``'s draws replaced by JAX's
shaped ones for "shaped"): a transformer block's training forward (dropout 0.1), the benchmark
CNN's initialisation (LeCun-normal kernels) compiled as ``create_train_state`` compiles it (LLVM
level 0) and at LLVM's default level (a user's own ``jit`` of ``model.init``), and a dropout
MLP's training step.  Each cell is ``jit(f).lower(...).compile()`` with no persistent
cache, in interleaved rounds; medians, and shaped over flat (> 1: flat compiles quicker).  Then
each compiled program runs for ``--slot`` seconds per round, in as many interleaved rounds
(0: none): ms per call, and shaped over flat (> 1: flat runs quicker; 1: the draws cost the same).
``--only``: the rows whose name contains one of the texts.
The runs are in docs/benchmarks.md, "Random draws".
"""

from __future__ import annotations

import statistics
import sys
import time
from contextlib import contextmanager

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

from benchmarks import harness

RANK_SHAPES = {1: (960,), 2: (32, 30), 3: (8, 12, 10), 4: (4, 8, 6, 5)}


@contextmanager
def form(name: str):
    """``flat`` (fundl's draws as shipped) or ``shaped`` (JAX's draw called with the shape)."""
    from fundl.nn import flat_random

    shipped = flat_random._flat
    if name == "shaped":
        flat_random._flat = lambda draw, key, shape, *args, **kwargs: draw(key, *args, shape=tuple(shape), **kwargs)
    try:
        yield
    finally:
        flat_random._flat = shipped


def programs() -> dict:
    """name -> a function building ``(jitted function, arguments)`` (traced under the current form)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from benchmarks import peers
    from fundl import models, nn
    from fundl.nn import flat_random
    from fundl.train.state import create_train_state, init_compiler_options
    from fundl.train.step import make_train_step

    key = jax.random.key(0)
    out = {}
    for rank, shape in RANK_SHAPES.items():
        out[f"bernoulli rank {rank}"] = lambda s=shape: (jax.jit(lambda k: flat_random.bernoulli(k, 0.9, s)), (key,))
        out[f"normal rank {rank}"] = lambda s=shape: (jax.jit(lambda k: flat_random.normal(k, s)), (key,))

    def block():
        layer = nn.transformer_block(4, dropout=0.1)
        params, state, _ = layer.init(key, (8, 32, 64))
        x = jnp.ones((8, 32, 64))
        return jax.jit(lambda p, x, k: layer.apply(p, state, x, key=k, train=True)[0]), (params, x, key)

    def cnn_init(level0: bool):  # level 0: as create_train_state compiles it; else as a user's own jit does
        spec = peers.SPECS["cnn"]
        model, shape = peers.fundl_model(spec), (peers.BATCH,) + tuple(spec["x"])
        options = init_compiler_options() if level0 else None
        return jax.jit(lambda k: model.init(k, shape)[:2], compiler_options=options), (key,)

    def mlp_dropout_step():
        model, opt = models.mlp([128], 10, dropout=0.1), optax.adam(1e-3)
        state = create_train_state(model, opt, 0, (1, 784))
        batch = {"x": np.zeros((128, 784), np.float32), "y": np.zeros((128,), np.int32)}
        return jax.jit(make_train_step(model, opt)), (state, batch)

    out.update({"transformer block, training forward": block,
                "CNN initialisation": lambda: cnn_init(True),
                "CNN initialisation, LLVM's default level": lambda: cnn_init(False),
                "MLP with dropout, training step": mlp_dropout_step})
    return out


def main(argv=None) -> int:
    parser = harness.parser(__doc__, __spec__.name)
    harness.add_rounds(parser, 5)
    parser.add_argument("--slot", type=float, default=0.5, help="seconds of calls per program per round (0: none)")
    parser.add_argument("--only", default="", help="comma-separated texts: the rows whose name contains one")
    harness.add_out(parser)
    args = parser.parse_args(argv)

    import jax
    jax.config.update("jax_enable_compilation_cache", False)

    started = harness.start()
    built = {n: b for n, b in programs().items() if not args.only or any(t in n for t in harness.names(args.only))}
    if not built:
        parser.error(f"--only {args.only!r} names no row; rows: {', '.join(programs())}")

    compiled = {}  # (name, form) -> (executable, arguments), from the last compile round

    def measure(name, which):
        def run():
            with form(which):
                fn, fargs = built[name]()
                lowered = fn.lower(*fargs)
            t = time.perf_counter()
            compiled[(name, which)] = (lowered.compile(), fargs)
            return time.perf_counter() - t
        return run

    cells = [(n, w) for n in built for w in ("shaped", "flat")]
    figures = harness.interleaved({c: measure(*c) for c in cells}, args.rounds,
                                  on_round=lambda r, f: print(f"compile round {r + 1}", file=sys.stderr))
    for exe, fargs in compiled.values():
        jax.block_until_ready(exe(*fargs))  # warm
    runs = harness.calls_per_round({c: (lambda e=compiled[c]: e[0](*e[1])) for c in cells},
                                   args.rounds if args.slot > 0 else 0, args.slot)
    rows, record = [], {}
    for name in built:
        shaped, flat = figures[(name, "shaped")], figures[(name, "flat")]
        ratio = harness.median_ratio(shaped, flat)
        record[name] = {"shaped_s": shaped, "flat_s": flat, "shaped_over_flat": ratio,
                        "shaped_call_s": runs[(name, "shaped")], "flat_call_s": runs[(name, "flat")]}
        row = [name, f"{statistics.median(shaped):.3f}", f"{statistics.median(flat):.3f}", f"{ratio:.2f}"]
        if args.slot > 0:
            calls = runs[(name, "shaped")], runs[(name, "flat")]
            record[name]["shaped_over_flat_call"] = harness.median_ratio(*calls)
            row += [f"{1e3 * statistics.median(calls[0]):.3f}", f"{1e3 * statistics.median(calls[1]):.3f}",
                    f"{record[name]['shaped_over_flat_call']:.2f}"]
        rows.append(row)
    result = harness.finish(started, __spec__.name, argv)
    result.update(rounds=args.rounds, slot=args.slot, only=args.only, programs=record)
    head = ["program", "shaped compile s", "flat compile s", "shaped / flat"]
    if args.slot > 0:
        head += ["shaped ms per call", "flat ms per call", "shaped / flat (run)"]
    md = "\n".join([harness.header(result), "", harness.markdown_table(head, rows, "l" + "r" * (len(head) - 1))])
    print(md)
    harness.write_result(args.out, "random_compile", result, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
