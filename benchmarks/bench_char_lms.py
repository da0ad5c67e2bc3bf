"""The two shipped character LMs' training steps, timed in turn: how long each config's training takes.

    python -m benchmarks.bench_char_lms [--rounds 5] [--seconds 5] [--set KEY=VALUE ...] [--out DIR]

Issue 25's second target compares ``configs/shakespeare_char_gpt.toml`` with
``configs/shakespeare_char_lm.toml`` (the LSTM): the GPT's validation loss must be lower, in at most 1.5x the
LSTM's training time.  The losses come from ``scripts/train.py`` runs of the two configs; the time ratio comes
from here, because on a shared machine two runs made at different moments see different loads.  Each config's
jitted train step (``fundl.run.build``, as ``scripts/train.py`` builds it, one step per call) runs on one real
batch of its config for ``--seconds``, the two in turn for ``--rounds`` rounds (order rotated;
``benchmarks.harness.interleaved``), after one compiled warm-up call each.  Reported: ms per step (median
over rounds), and the training-time ratio, GPT / LSTM, = the median per-round ratio of the step times times
the ratio of the configs' ``training.steps``.  ``--set`` overrides apply to the GPT's config (a candidate
recipe).  docs/benchmarks.md records the runs.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

from benchmarks import harness

MODULE = "benchmarks.bench_char_lms"
CONFIGS = {"lstm": harness.CONFIGS / "shakespeare_char_lm.toml", "gpt": harness.CONFIGS / "shakespeare_char_gpt.toml"}


def step_of(path, overrides):
    """``(call, steps)``: one training step of the config at ``path`` on its first batch, and its steps."""
    from fundl.run.build import total_steps_of
    from fundl.run.config import load_config

    config = load_config(path, overrides)
    call, steps_per_epoch = harness.config_step(config)
    return call, total_steps_of(config, steps_per_epoch)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = harness.parser(__doc__, MODULE)
    harness.add_rounds(p, 5)
    p.add_argument("--seconds", type=float, default=5.0, help="seconds of steps per measure per round")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="overrides of the GPT's config")
    harness.add_out(p)
    args = p.parse_args(argv)

    started = harness.start()
    calls, steps = {}, {}
    for name, path in CONFIGS.items():
        calls[name], steps[name] = step_of(path, args.set if name == "gpt" else [])
    figures = harness.calls_per_round(calls, args.rounds, args.seconds, progress=True)
    step_ratio = harness.median_ratio(figures["gpt"], figures["lstm"])
    time_ratio = step_ratio * steps["gpt"] / steps["lstm"]
    record = harness.finish(started, MODULE, argv)
    record.update(overrides=args.set, steps=steps, seconds_per_step=figures, step_ratio=step_ratio,
                  training_time_ratio=time_ratio)
    rows = [(name, steps[name], f"{harness.spread(figures[name])['median'] * 1e3:.1f}",
             f"{harness.spread(figures[name])['min'] * 1e3:.1f}", f"{harness.spread(figures[name])['max'] * 1e3:.1f}",
             f"{steps[name] * harness.spread(figures[name])['median']:.0f}") for name in CONFIGS]
    table = harness.markdown_table(["config", "steps", "ms / step median", "min", "max", "steps x median (s)"],
                                   rows, "lrrrrr")
    markdown = (harness.header(record) + "\n\n" + table + f"\n\nGPT step / LSTM step (median of rounds): "
                f"{step_ratio:.2f}; training time GPT / LSTM: {time_ratio:.2f} (target <= 1.5)")
    print(markdown)
    harness.write_result(args.out, "char_lms", record, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
