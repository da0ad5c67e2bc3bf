"""Compile time against step time of the benchmark CNN's training step, per convolution
lowering: the trade behind ``fundl.nn.conv_lowering``.

    python -m benchmarks.bench_conv_compile [--rounds 3] [--variants weight,weight:8,all,whole] [--slot 1]
                                            [--step-rounds N] [--out DIR]

Variants (each applied to every convolution that ``conv_lowering.cpu_chunks`` splits; the
others stay whole):

* ``weight`` -- the shipped ``convolve``: one convolution forward and for the input gradient,
  the weight gradient in the rule's chunks; ``weight:K`` -- the same in ``K`` chunks;
* ``all`` -- the lowering shipped before issue 26: forward and both gradients in the rule's
  chunks (``conv_lowering.in_chunks`` on the whole convolution); ``all:K`` -- in ``K`` chunks;
* ``whole`` -- one convolution each, as the JAX peers lower it.

The variant reaches the model by replacing ``fundl.nn.conv.convolve``, the name the
convolution layers call at trace time, while that variant's step is built and traced.
First, interleaved rounds of compiling the jitted step (``jit(step).lower(...).compile()``,
no persistent cache; the convolutions in its StableHLO are counted too); then every
variant's step is run in ``--step-rounds`` interleaved rounds (default 3 x ``--rounds``; 0: compile
only) of ``--slot`` seconds.  Reported: convolutions,
compile seconds (median and range), ms per step (median) and the speed against the first
variant (median over rounds of its step time / this one's; > 1 = faster).  The runs are in
docs/benchmarks.md, "First step".
"""

from __future__ import annotations

import statistics
import sys
import time

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

from benchmarks import harness


def lowering(variant: str):
    """The ``convolve`` replacement for ``variant`` (``weight[:K]``, ``all[:K]`` or ``whole``)."""
    import math

    import jax
    from jax import lax

    from fundl.nn import conv_lowering

    form, _, count = variant.partition(":")
    if form not in ("weight", "all", "whole") or (count and (form == "whole" or not count.isdigit())):
        raise ValueError(f"unknown variant {variant!r}: expected weight[:K], all[:K] or whole")

    def chunks_for(x, w, conv_args):
        out = jax.eval_shape(lambda a, b: lax.conv_general_dilated(a, b, **conv_args), x, w)
        rule = conv_lowering.cpu_chunks(x.shape[0], math.prod(out.shape) * out.dtype.itemsize, x.ndim - 2)
        return 1 if form == "whole" or rule == 1 else int(count or rule)

    def convolve(x, w, bias=None, **conv_args):
        k = chunks_for(x, w, conv_args)
        if form != "all" or k == 1:
            return conv_lowering.convolve(x, w, bias, chunks=k, **conv_args)

        def conv(a, b):
            y = lax.conv_general_dilated(a, b, **conv_args)
            return y if bias is None else y + bias

        return lax.platform_dependent(
            x, w, cpu=lambda a, b: conv_lowering.in_chunks(conv, a, b, k), default=conv)

    return convolve


def build(variant: str, run: bool):
    """The benchmark CNN's jitted step (``peers.build_fundl``) and its lowering, under ``variant``;
    ``run``: also run it twice (trace and compile it for the step rounds; a later
    ``lowered.compile()`` would then come from JAX's in-memory cache)."""
    import fundl.nn.conv as conv_layers
    from benchmarks import peers

    shipped = conv_layers.convolve
    conv_layers.convolve = lowering(variant)
    try:
        runner = peers.build_fundl(peers.SPECS["cnn"])
        lowered = runner.jitted.lower(*runner.args())
        if run:
            runner.run(2)  # traced now, while the variant is in place
    finally:
        conv_layers.convolve = shipped
    return runner, lowered


def main(argv=None) -> int:
    parser = harness.parser(__doc__, __spec__.name)
    harness.add_rounds(parser, 3)
    parser.add_argument("--variants", default="weight,weight:8,weight:4,all,whole")
    parser.add_argument("--slot", type=float, default=1.0, help="seconds of steps per variant per round")
    parser.add_argument("--step-rounds", type=int, default=None, help="step rounds (default 3 x --rounds; 0: none)")
    harness.add_out(parser)
    args = parser.parse_args(argv)
    variants = harness.names(args.variants)
    for v in variants:
        lowering(v)  # refuse a bad name before measuring

    import jax
    jax.config.update("jax_enable_compilation_cache", False)

    started = harness.start()
    convolutions = {}

    def compile_seconds(variant):
        def measure():
            _, lowered = build(variant, run=False)
            convolutions[variant] = lowered.as_text().count("stablehlo.convolution")
            t = time.perf_counter()
            lowered.compile()
            return time.perf_counter() - t
        return measure

    compiles = harness.interleaved({v: compile_seconds(v) for v in variants}, args.rounds,
                                   on_round=lambda r, f: print(f"compile round {r}", file=sys.stderr))
    step_rounds = args.rounds * 3 if args.step_rounds is None else args.step_rounds
    runners = {v: build(v, run=True)[0] for v in variants} if step_rounds else {}
    steps = harness.interleaved({v: (lambda r=runners[v]: harness.seconds_per_call(
        r.step, args.slot, lambda _, r=r: r.block())) for v in runners}, step_rounds)
    record = harness.finish(started, __spec__.name, argv)
    base = variants[0]
    rows = []
    for v in variants:
        c = harness.spread(compiles[v])
        timed = bool(steps.get(v))
        rows.append([v, convolutions[v], f"{c['median']:.2f} ({c['min']:.2f}-{c['max']:.2f})",
                     f"{statistics.median(steps[v]) * 1e3:.1f}" if timed else "",
                     f"{harness.median_ratio(steps[base], steps[v]):.2f}" if timed else ""])
    markdown = harness.markdown_table(
        ["lowering", "convolutions", "compile s (range)", "ms per step", f"speed vs {base}"], rows, "lrrrr")
    print(f"{args.rounds} compile rounds, {step_rounds} step rounds of {args.slot} s; " + harness.header(record))
    print(markdown)
    record.update(compile_seconds=compiles, step_seconds=steps, convolutions=convolutions)
    harness.write_result(args.out, "conv_compile", record, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
