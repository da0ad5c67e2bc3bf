"""Where a config's ``fit`` spends its time: each part of the loop timed, call by call.

    python -m benchmarks.profile_fit --config configs/mnist1d_paper_logistic.toml [--steps 4000] [--set KEY=VALUE ...]

Runs the config (shortened to ``--steps``) through ``fundl.run.experiment.run`` twice,
the first as a warm-up, and reports for the second the training time per step
over the timed window of ``benchmarks.bench_end_to_end`` (first to last train
log) and, for every part of the loop — the compiled step calls, taking the
next batch, logging (which waits for the device), evaluations, checkpoints —
the number of calls, their sum, median and maximum.  A maximum far above the
median is a one-off inside the run, such as a compile.  The step calls are
timed on one device (``parallel.mode = "none"``, the default), not under the
multi-device placements.  docs/benchmarks.md quotes what it showed.
"""

from __future__ import annotations

import collections
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

from benchmarks import bench_end_to_end as e2e
from benchmarks import harness

TIMES: dict[str, list[float]] = collections.defaultdict(list)


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name].append(time.perf_counter() - t)

    return wrapper


def instrument() -> None:
    """Wrap the loop's parts (class and module attributes: every run from now on is timed)."""
    from fundl.data import loader
    from fundl.run import experiment
    from fundl.train import loop, placement
    from fundl.train.checkpoint import Checkpointer

    compile_train = placement.MeshPlacement.compile_train

    def timed_compile(self, step, steps_per_call=1, unroll=1):
        return timed(f"step call ({steps_per_call} per dispatch)", compile_train(self, step, steps_per_call, unroll))

    placement.MeshPlacement.compile_train = timed_compile
    loader.BatchIterator.__next__ = timed("next batch", loader.BatchIterator.__next__)
    loop._TrainMetrics.fetch = timed("log (waits for the device)", loop._TrainMetrics.fetch)
    Checkpointer.save = timed("checkpoint", Checkpointer.save)
    make_evaluator = experiment.make_evaluator
    experiment.make_evaluator = lambda *args, **kwargs: timed("evaluation", make_evaluator(*args, **kwargs))


def main(argv=None) -> int:
    p = harness.parser(__doc__, __spec__.name)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    from fundl.run import config as cfg

    config = cfg.load_config(args.config, args.set)
    instrument()
    e2e.time_fit(config, min(args.steps, 3 * config["training"]["log_every"]))  # warm-up: imports, caches
    TIMES.clear()
    seconds, steps, _, summary = e2e.time_fit(config, args.steps)
    print(f"{args.config.stem}: {seconds / steps * 1e6:.1f} us per step over the {steps} timed steps "
          f"({summary['steps_per_call']} steps per dispatch)")
    print(f"{'part':34s} {'calls':>6s} {'sum ms':>9s} {'median us':>10s} {'max ms':>8s}")
    for name, values in TIMES.items():
        print(f"{name:34s} {len(values):6d} {sum(values) * 1e3:9.1f} {statistics.median(values) * 1e6:10.0f} "
              f"{max(values) * 1e3:8.1f}")
    print("(calls and sums cover the whole run, compile and the final evaluation included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
