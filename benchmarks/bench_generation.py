"""Generation with the KV cache against recomputing the context at every token (issue 25's target: >= 5x).

Usage:  python -m benchmarks.bench_generation [--context 256] [--layers 4] [--heads 4] [--width 128]
                                               [--batch 1] [--rounds 5] [--out DIR]

A GPT (``models.gpt``, vocabulary 65, random weights) generates greedily from a one-token prompt
to a full context (``context - 1`` new tokens), two ways, each one compiled program:

* ``cache``: ``fundl.generate`` (a prefill, then one step per token against the fixed-size cache);
* ``recompute``: a ``lax.fori_loop`` that runs the whole model on the context buffer
  (``context`` positions, causal, so the positions not yet written do not matter) for every
  token, and takes the argmax at the newest position: generation without a cache.

Both produce the same tokens (checked).  Figures are tokens per second, the median over
interleaved rounds; the ratio is the median of the per-round ratios (benchmarks/harness.py).
docs/benchmarks.md records a run.
"""

from __future__ import annotations

import sys
import time

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from fundl import models
from fundl.generation import generate

MODULE = "benchmarks.bench_generation"
VOCAB = 65


@functools.partial(jax.jit, static_argnums=(0, 3))
def recompute(model, params, prompt, num_tokens):
    """Greedy tokens by running the model on the whole context buffer for each new token."""
    b, tp = prompt.shape
    out = jnp.zeros((b, tp + num_tokens), jnp.int32).at[:, :tp].set(prompt)

    def body(t, out):
        logits = model.apply(params, {}, out)[0]
        token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False), -1)
        return jax.lax.dynamic_update_slice_in_dim(out, token[:, None].astype(jnp.int32), t, axis=1)

    return jax.lax.fori_loop(tp, tp + num_tokens, body, out)


def main(argv=None) -> int:
    p = harness.parser(__doc__, MODULE)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    harness.add_rounds(p, 5)
    harness.add_out(p)
    args = p.parse_args(argv)
    started = harness.start()
    model = models.gpt(VOCAB, context=args.context, layers=args.layers, heads=args.heads, width=args.width)
    params, _, _ = jax.jit(model.init, static_argnums=1)(jax.random.key(0), (1, args.context))
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (args.batch, 1)), jnp.int32)
    n = args.context - 1
    run = {"cache": lambda: generate(model, params, prompt, n, key=jax.random.key(0), temperature=0.0),
           "recompute": lambda: recompute(model, params, prompt, n)}
    outs = {name: np.asarray(fn()) for name, fn in run.items()}  # compiles both; the same tokens
    np.testing.assert_array_equal(outs["cache"], outs["recompute"])

    def tokens_per_second(fn):
        def measure():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            return args.batch * n / (time.perf_counter() - t)
        return measure

    figures = harness.interleaved({name: tokens_per_second(fn) for name, fn in run.items()}, args.rounds,
                                  lambda r, f: print(f"round {r + 1}/{args.rounds}", file=sys.stderr))
    record = harness.finish(started, MODULE, argv)
    record.update({"args": vars(args) | {"out": str(args.out)}, "tokens_per_second": figures,
                   "ratio": harness.median_ratio(figures["cache"], figures["recompute"])})
    table = harness.markdown_table(
        ["variant", "tokens/s (median)", "min", "max"],
        [[name, f"{harness.spread(v)['median']:.0f}", f"{min(v):.0f}", f"{max(v):.0f}"] for name, v in figures.items()],
        "lrrr")
    markdown = (f"{harness.header(record)}\n\nGPT {args.layers} x {args.width}, {args.heads} heads, context "
                f"{args.context}, batch {args.batch}: {n} greedy tokens from a 1-token prompt\n\n{table}\n\n"
                f"cache / recompute (median of per-round ratios): {record['ratio']:.1f}x")
    print(markdown)
    harness.write_result(args.out, "bench_generation", record, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
