"""Which convolutions run faster over the batch in chunks, per layer shape: the table behind
``fundl.nn.conv_lowering``'s rule.

    python -m benchmarks.bench_conv_chunks [--rounds 5] [--slot 0.1] [--only 2d] [--chunk-sizes 64,32,16,8,4,2]

For each layer shape (the benchmark's and the shipped configs' convolutions, and a few
larger ones), one jitted gradient of ``<conv(x, w), r>`` with respect to ``w`` and, except
for a first layer, ``x`` (a training step's convolution work: forward, weight gradient and
input gradient), computed whole and with the weight gradient in chunks of 64, 32, ... examples
(``fundl.nn.conv_lowering.convolve(..., chunks=k)``; before issue 26 the forward and the input
gradient were chunked too: ``benchmarks.bench_conv_compile`` compares both lowerings per step).  Interleaved rounds of ``--slot``
seconds per variant; reported: the whole-batch time (ms) and each chunk size's speed-up
(median over rounds of whole time / chunked time, > 1 = chunking is faster), beside what
the rule picks.  docs/benchmarks.md, "CNN", records the runs.
"""

from __future__ import annotations

import math
import statistics
import sys

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

from benchmarks import harness

# name, input shape, kernel shape, stride, gradient wrt the input too
SHAPES = [
    ("2d 28x28x1 -> 32, k3", (128, 28, 28, 1), (3, 3, 1, 32), 1, False),
    ("2d 14x14x32 -> 64, k3", (128, 14, 14, 32), (3, 3, 32, 64), 1, True),
    ("2d 28x28x32 -> 64, k3", (128, 28, 28, 32), (3, 3, 32, 64), 1, True),
    ("2d 32x32x3 -> 64, k3", (128, 32, 32, 3), (3, 3, 3, 64), 1, False),
    ("2d 16x16x64 -> 128, k3", (128, 16, 16, 64), (3, 3, 64, 128), 1, True),
    ("2d 7x7x64 -> 64, k3", (128, 7, 7, 64), (3, 3, 64, 64), 1, True),
    ("1d 40x1 -> 25, k5 s2", (100, 40, 1), (5, 1, 25), 2, False),
    ("1d 20x25 -> 25, k5 s2", (100, 20, 25), (5, 25, 25), 2, True),
    ("1d 10x25 -> 25, k5 s2", (100, 10, 25), (5, 25, 25), 2, True),
    ("1d 1024x16 -> 32, k9", (128, 1024, 16), (9, 16, 32), 1, True),
]


def build(shapes, chunk_sizes):
    """{(name, examples per chunk): (jitted gradient, args)} and the rule's pick per shape."""
    import jax
    import jax.numpy as jnp

    from fundl.nn.conv_lowering import convolve, cpu_chunks

    fns, picks = {}, {}
    for name, x_shape, w_shape, stride, wrt_x in shapes:
        nd = len(x_shape) - 2
        dims = ("NWC", "WIO", "NWC") if nd == 1 else ("NHWC", "HWIO", "NHWC")
        args = dict(window_strides=(stride,) * nd, padding="SAME", dimension_numbers=dims)
        kx, kw, kr = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, x_shape)
        w = jax.random.normal(kw, w_shape) / math.sqrt(math.prod(w_shape[:-1]))
        out = jax.eval_shape(lambda a, b: convolve(a, b, chunks=1, **args), x, w)
        r = jax.random.normal(kr, out.shape)
        batch = x_shape[0]
        picks[name] = (batch // cpu_chunks(batch, math.prod(out.shape) * 4, nd), math.prod(out.shape) * 4)
        for size in [batch] + [c for c in chunk_sizes if c < batch and batch % c == 0]:
            def loss(a, b, k=batch // size, args=args, r=r):
                return jnp.vdot(convolve(a, b, chunks=k, **args), r)
            grad = jax.jit(jax.grad(loss, argnums=(0, 1) if wrt_x else 1))
            fns[(name, size)] = (grad, (x, w))
    return fns, picks


def measure(fns, rounds: int, slot: float) -> dict:
    """Seconds per call of every variant, per round (``harness.calls_per_round``, ``slot`` seconds each)."""
    import jax

    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    return harness.calls_per_round({key: (lambda fn=fn, args=args: fn(*args)) for key, (fn, args) in fns.items()},
                                   rounds, slot)


def table(times, picks, chunk_sizes) -> str:
    names = list(dict.fromkeys(name for name, _ in times))
    rows = []
    for name in names:
        sizes = sorted((size for n, size in times if n == name), reverse=True)
        whole = times[(name, sizes[0])]
        cells = [f"{harness.median_ratio(whole, times[(name, c)]):.2f}" if (name, c) in times and c != sizes[0]
                 else "" for c in chunk_sizes]
        pick, out_bytes = picks[name]
        rule = "whole" if pick == sizes[0] else f"chunks of {pick}"
        rows.append([f"{name} ({sizes[0]})", f"{out_bytes / 2**20:.2f}", f"{statistics.median(whole) * 1e3:.2f}",
                     *cells, rule])
    return harness.markdown_table(["layer (batch)", "output MiB", "whole, ms", *(f"chunks of {c}" for c in chunk_sizes),
                                   "rule picks"], rows, "lrr" + "r" * len(chunk_sizes) + "l")


def main(argv=None) -> int:
    parser = harness.parser(__doc__, __spec__.name)
    harness.add_rounds(parser, 5)
    parser.add_argument("--slot", type=float, default=0.1, help="seconds per variant per round")
    parser.add_argument("--only", default="", help="only the shapes whose name contains this")
    parser.add_argument("--chunk-sizes", default="64,32,16,8,4,2")
    args = parser.parse_args(argv)
    chunk_sizes = [int(c) for c in harness.names(args.chunk_sizes)]
    shapes = [s for s in SHAPES if args.only in s[0]]
    if not shapes:
        parser.error(f"--only {args.only!r} matches none of: " + ", ".join(s[0] for s in SHAPES))
    started = harness.start()
    fns, picks = build(shapes, chunk_sizes)
    times = measure(fns, args.rounds, args.slot)
    print(f"{args.rounds} interleaved rounds of {args.slot} s per variant; speed-up = whole / chunked time; "
          + harness.header(harness.finish(started, __spec__.name, argv)))
    print(table(times, picks, chunk_sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
