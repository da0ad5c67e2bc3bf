"""End-to-end speed: every shipped config through the real ``fit``, beside its bare step.

    python -m benchmarks.benchmark --end-to-end [--steps 600] [--rounds 2] [--configs a,b] [--out DIR]
    python -m benchmarks.bench_end_to_end ...            (the same)
    python -m benchmarks.bench_end_to_end --ab data.prefetch=0,2 [--configs a,b] [--rounds 5]
    python -m benchmarks.bench_end_to_end --device-data [--configs a,b] [--steps 1500] [--rounds 7]

Per config (``configs/*.toml``, shortened to ``--steps`` optimiser steps, or
fewer for slow models: as many as its bare step runs in ``--seconds``; its
loader, prefetch, logging, evaluations and checkpoints at their configured
intervals, plus the final evaluation and checkpoint), three ways to train the
same model with the same step, measured in the same process, in interleaved
rounds:

* ``fit``: ``fundl.run.experiment.run`` — what ``scripts/train.py`` runs — for N
  steps into a fresh temporary run directory; the time is read from its
  ``metrics.jsonl``: from the first logged train record to the last, so the
  first interval (trace and compile) and the final evaluation and checkpoint
  are left out, and the logs, evaluations and checkpoints at their intervals
  in between count (an evaluation at step s falls in the interval after s);
* ``bare``: the jitted, donated train step called on one batch already on
  the device, nothing else (what ``benchmarks.benchmark`` times);
* ``hand``: the loop a user writes by hand in plain JAX: shuffled NumPy
  batches, one jitted donated step per batch, the loss fetched every 100
  steps (no evaluation, no checkpoints).

``--ab KEY=V1,V2,...`` instead runs only ``fit``, once per value of one config
key in every round (order rotated per round), and reports each value's median
examples/s and its ratio to the first value's: how defaults are chosen, by
measurement through the real entry point.

``--device-data`` instead runs only the hand loop, two ways over the same
shuffled order, alternating per round: **host** (each batch gathered with
NumPy and passed to the step) and **device** (the training arrays put on the
device once, the step given the batch's example indices and gathering them
inside the compiled step: DESIGN.md's "small datasets can live on the
device").  It prints, per config, microseconds per step and the median of the
per-round ratio host time / device time (> 1: the device gather wins).  Its
default configs are ``mnist1d_paper_cnn,mnist1d_cnn,mnist_mlp``.

Reported: the median examples/s of each, ``fit/bare`` and ``hand time / fit
time``, beside the issue's targets.  Configs whose data are not on this machine
are skipped with the reason.  ``tiny_synthetic`` (the tests' fixture, which
evaluates and checkpoints every 12 steps on purpose), ensemble or sweep
configs (``benchmarks.bench_ensemble`` measures those) and DP-SGD configs
(whose step is another program than the bare step here) run only when named.
docs/benchmarks.md, "End to end", records the runs.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

from benchmarks import harness

DEVICE_DATA_CONFIGS = "mnist1d_paper_cnn,mnist1d_cnn,mnist_mlp"


# ---------------------------------------------------------------------------
# A config's step, three ways


def setup(config: dict):
    """Data, loader, initial state and train step of a config, built as ``fundl.run.build`` builds them."""
    from fundl.run import build
    from fundl.data import Loader
    from fundl.losses import softmax_cross_entropy
    from fundl.metrics import classification_metrics
    from fundl.train.step import make_train_step

    t = config["training"]
    data = build.load_data(config)
    loader = Loader(data.train, t["batch_size"], seed=t["seed"], drop_last=True, prefetch=0)
    model, opt, state = build.initial_state(config, data, loader.steps_per_epoch)
    step = make_train_step(model, opt, softmax_cross_entropy, classification_metrics(),
                           compute_dtype=t["compute_dtype"], loss_scale=t["loss_scale"] or None)
    return data, loader, state, step


def time_bare(config: dict, steps: int) -> float:
    """Seconds for ``steps`` calls of the jitted, donated step on one device-resident batch."""
    import jax

    _, loader, state, step = setup(config)
    f = jax.jit(step, donate_argnums=0)
    batch = jax.device_put(loader.batch(0, 0))
    for _ in range(2):
        state, _ = f(state, batch)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, _ = f(state, batch)
    jax.block_until_ready(state)
    return time.perf_counter() - t0


def time_hand(config: dict, steps: int, device_data: bool = False) -> float:
    """Seconds for the hand-written plain-JAX loop (shuffled NumPy batches, loss every 100 steps).

    ``device_data``: the training arrays put on the device once, the step given each batch's
    example indices and gathering them itself (``--device-data``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    data, loader, state, step = setup(config)
    x, y, b = data.train["x"], data.train["y"], loader.batch_size
    if device_data:
        arrays = jax.device_put({"x": x, "y": y})
        gather = jax.jit(lambda s, arrays, ids: step(s, {k: jnp.take(v, ids, axis=0) for k, v in arrays.items()}),
                         donate_argnums=0)
        f = lambda s, ids: gather(s, arrays, ids)  # noqa: E731
    else:
        jitted = jax.jit(step, donate_argnums=0)
        f = lambda s, ids: jitted(s, {"x": x[ids], "y": y[ids]})  # noqa: E731 - the batch gathered by NumPy
    rng = np.random.default_rng(0)

    def batches():
        while True:
            perm = rng.permutation(len(y)).astype(np.int32)
            for i in range(len(y) // b):
                yield perm[i * b:(i + 1) * b]

    it = batches()
    for _ in range(2):
        state, m = f(state, next(it))
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for i in range(steps):
        state, m = f(state, next(it))
        if (i + 1) % 100 == 0:
            float(m["loss"])
    jax.block_until_ready(state)
    return time.perf_counter() - t0


class FitTiming(NamedTuple):
    seconds: float     # from the first logged train record to the last
    steps: int         # optimiser steps in that window
    first_step: int    # the step of the first logged train record
    summary: dict      # the run's summary.json


def shortened(config: dict, steps: int, **training) -> dict:
    """``config`` cut to ``steps`` steps, quiet (no progress bar, plots or TensorBoard), its warm-up
    kept valid, with ``training`` keys overridden; validated."""
    from fundl.run import config as cfg

    schedule = {**config["schedule"], "warmup_steps": min(config["schedule"]["warmup_steps"], steps // 10)}
    return cfg.validate({**config, "training": {**config["training"], "steps": steps, "progress": False, **training},
                         "logging": {**config["logging"], "plots": False, "tensorboard": False},
                         "schedule": schedule})


def run_fit(config: dict) -> tuple[dict, list[dict]]:
    """``fundl.run.experiment.run`` of ``config`` in a fresh temporary run directory: its summary and records."""
    from fundl.run import experiment
    from fundl.run.rundir import read_metrics

    with tempfile.TemporaryDirectory(prefix="fundl-e2e-") as tmp:
        summary = experiment.run(config, Path(tmp) / "run", verbose=False)
        return summary, read_metrics(Path(tmp) / "run")


def full_run_steps_per_call(config: dict):
    """The config's ``training.steps_per_call`` as its full-length run resolves it: a shortened
    run would fuse nothing under ``"auto"`` (``fundl.train.fusion.AUTO_MIN_STEPS``), and this
    benchmark times a window of the full run."""
    if config["training"]["steps_per_call"] != "auto":
        return config["training"]["steps_per_call"]
    from fundl.train.fusion import resolve

    _, loader, state, step = setup(config)
    return resolve("auto", step, state, loader.batch(0, 0))[0]


def time_fit(config: dict, steps: int, *, min_logs: int = 3, **training) -> FitTiming:
    """``run_fit`` of ``shortened(config, steps, **training)``, timed from its first logged train
    record to its last (at least ``min_logs`` of them, so that ``min_logs - 1`` intervals are timed);
    fused as the full run would be (:func:`full_run_steps_per_call`)."""
    training.setdefault("steps_per_call", full_run_steps_per_call(config))
    summary, records = run_fit(shortened(config, steps, **training))
    train = [r for r in records if r["split"] == "train"]
    if len(train) < min_logs:
        raise ValueError(f"{steps} steps give {len(train)} train logs; need {min_logs} "
                         "(raise --steps or lower log_every)")
    return FitTiming(train[-1]["wall_time"] - train[0]["wall_time"], train[-1]["step"] - train[0]["step"],
                     train[0]["step"], summary)


def calibrated_steps(config: dict, steps: int, seconds: float) -> int:
    """``steps``, or fewer when the bare step would take longer than ``seconds`` (at least three log
    intervals, so that two are timed)."""
    rate = 20 / time_bare(config, 20)
    log = config["training"]["log_every"]
    return max(3 * log, min(steps, int(rate * seconds) // log * log))


# ---------------------------------------------------------------------------
# The three measurements


def load_configs(config_paths: list[Path]) -> tuple[dict, dict]:
    """``({name: config}, {name: row})``: the configs whose data are on this machine, and a row per
    config in ``config_paths``' order, empty to fill in, or ``{"skipped": reason}``."""
    from fundl.run import config as cfg
    from fundl.data.errors import DataNotFoundError

    configs, rows = {}, {}
    for path in config_paths:
        config = cfg.load_config(path)
        try:
            setup(config)  # loads the data: skip what is not on this machine
        except DataNotFoundError as e:
            rows[path.stem] = {"skipped": str(e).splitlines()[0]}
            continue
        configs[path.stem], rows[path.stem] = config, {}
    return configs, rows


def with_setting(config: dict, key: str, value: str) -> dict:
    """``config`` with ``key`` (``section.name``) set to ``value`` (TOML syntax), validated."""
    from fundl.run import config as cfg

    section, name, parsed = cfg.parse_override(f"{key}={value}")
    return cfg.validate({**config, section: {**config.get(section, {}), name: parsed}}, f"--ab {key}={value}")


def measure(config_paths: list[Path], steps: int, rounds: int, seconds: float = 10.0) -> dict:
    """fit, bare and hand per config, in rounds; bare and hand time as many steps as fit's window."""
    configs, rows = load_configs(config_paths)
    for name, config in configs.items():
        rows[name].update(bare=[], hand=[], fit=[], batch_size=config["training"]["batch_size"],
                          steps=calibrated_steps(config, steps, seconds))
    for rnd in range(rounds):
        for name, config in configs.items():
            row = rows[name]
            fit = time_fit(config, row["steps"])
            row["fit"].append(fit.seconds)
            row["bare"].append(time_bare(config, fit.steps))  # the same number of steps as the timed part of fit
            row["hand"].append(time_hand(config, fit.steps))
            row["timed_steps"] = fit.steps
            row.update(steps_per_call=fit.summary["steps_per_call"], unroll=fit.summary["unroll"],
                       compile_s=fit.summary["compile_seconds"])
            print(f"round {rnd + 1}/{rounds} {name}: bare {row['bare'][-1]:.2f} s, hand {row['hand'][-1]:.2f} s, "
                  f"fit {row['fit'][-1]:.2f} s", file=sys.stderr, flush=True)
    for name in configs:
        row = rows[name]
        for k in ("bare", "hand", "fit"):
            row[f"{k}_examples_per_s"] = row["timed_steps"] * row["batch_size"] / statistics.median(row[k])
        row["fit_over_bare"] = harness.median_ratio(row["bare"], row["fit"])
        row["hand_time_over_fit_time"] = harness.median_ratio(row["hand"], row["fit"])
    return rows


def measure_ab(config_paths: list[Path], key: str, values: list[str], steps: int, rounds: int,
               seconds: float) -> dict:
    """Seconds of ``fit`` per value of ``key``, interleaved, in every round."""
    loaded, rows = load_configs(config_paths)
    for name, config in loaded.items():
        variants = {v: with_setting(config, key, v) for v in values}
        row = rows[name]
        row.update(steps=calibrated_steps(config, steps, seconds), batch_size=config["training"]["batch_size"])

        def fit_seconds(variant, row=row):
            timing = time_fit(variant, row["steps"])
            row["timed_steps"] = timing.steps
            return timing.seconds

        def progress(rnd, figures, name=name):
            print(f"round {rnd + 1}/{rounds} {name}: " + ", ".join(f"{key}={v} {figures[v][-1]:.2f} s"
                                                                 for v in values), file=sys.stderr, flush=True)

        row.update(harness.interleaved({v: (lambda c=c: fit_seconds(c)) for v, c in variants.items()}, rounds,
                                       progress))
        row["examples_per_s"] = {v: row["timed_steps"] * row["batch_size"] / statistics.median(row[v])
                                 for v in values}
        row["ratio_to_first"] = {v: harness.median_ratio(row[values[0]], row[v]) for v in values}
    return rows


def measure_device_data(config_paths: list[Path], steps: int, rounds: int) -> dict:
    """The hand loop with host (NumPy) batches and with device-resident data, alternating per round."""
    from fundl.run import config as cfg

    rows = {}
    for path in config_paths:
        config = cfg.load_config(path)
        times = harness.interleaved({"host": lambda: time_hand(config, steps),
                                     "device": lambda: time_hand(config, steps, device_data=True)}, rounds)
        rows[path.stem] = {**times, "host_us_per_step": statistics.median(times["host"]) / steps * 1e6,
                           "device_us_per_step": statistics.median(times["device"]) / steps * 1e6,
                           "host_time_over_device_time": harness.median_ratio(times["host"], times["device"])}
        print(f"{path.stem}: host {rows[path.stem]['host_us_per_step']:.1f} us/step, device "
              f"{rows[path.stem]['device_us_per_step']:.1f} us/step, host time / device time "
              f"{rows[path.stem]['host_time_over_device_time']:.3f}", flush=True)
    return rows


# ---------------------------------------------------------------------------
# Tables


def markdown(result: dict) -> str:
    head = [f"End to end, up to {result['steps']} steps per config (fewer where the bare step would take over "
            f"{result['seconds']:g} s), median of {result['rounds']} interleaved rounds; " + harness.header(result), ""]
    rows = []
    for name, row in result["configs"].items():
        if "skipped" in row:
            rows.append([name, f"skipped: {row['skipped']}"] + [""] * 6)
            continue
        rows.append([name, row["steps"], f"{row['steps_per_call']}, {row['unroll']}", f"{row['bare_examples_per_s']:,.0f}",
                     f"{row['fit_examples_per_s']:,.0f}", f"{row['fit_over_bare']:.2f}",
                     f"{row['hand_examples_per_s']:,.0f}", f"{1 / row['hand_time_over_fit_time']:.2f}"])
    return "\n".join(head + [harness.markdown_table(
        ["config", "steps", "steps/call, unroll", "bare step ex/s", "fit ex/s", "fit / bare (target ≥ 0.9)",
         "hand-loop ex/s", "fit time / hand time (target ≤ 1.15)"], rows, "lrlrrrrr")])


def markdown_ab(result: dict) -> str:
    key, values = result["key"], result["values"]
    head = [f"`fit` examples/s by `{key}`, up to {result['steps']} steps per config, median of {result['rounds']} "
            f"interleaved rounds; " + harness.header(result), ""]
    rows = []
    for name, row in result["configs"].items():
        if "skipped" in row:
            rows.append([name, f"skipped: {row['skipped']}"] + [""] * (2 * len(values) - 2))
            continue
        rows.append([name] + [f"{row['examples_per_s'][v]:,.0f}" for v in values] +
                    [f"{row['ratio_to_first'][v]:.2f}" for v in values[1:]])
    return "\n".join(head + [harness.markdown_table(
        ["config"] + [f"{key}={v}" for v in values] + [f"{v} / {values[0]}" for v in values[1:]], rows,
        "l" + "r" * (2 * len(values) - 1))])


# ---------------------------------------------------------------------------
# The run


def config_paths(p, names: list[str], default: str = "") -> list[Path]:
    """The named configs' paths (``default`` when none are named; without one: every plain config
    but the tests' fixture), or a usage error naming the valid ones."""
    paths = sorted(harness.CONFIGS.glob("*.toml"))
    names = names or harness.names(default)
    if names:
        unknown = sorted(set(names) - {q.stem for q in paths})
        if unknown:
            p.error(f"unknown config(s) {unknown}; choose from {[q.stem for q in paths]}")
        return [q for q in paths if q.stem in names]
    from fundl.run import config as cfg

    def plain(q):
        c = cfg.load_config(q)
        return c["training"]["ensemble"] == 1 and not c["training"]["sweep"] and not c["privacy"]["enabled"]

    return [q for q in paths if q.stem != "tiny_synthetic" and plain(q)]


def main(argv=None) -> int:
    p = harness.parser(__doc__, __spec__.name)
    p.add_argument("--configs", default="",
                   help="comma-separated config names (default: every configs/*.toml but tiny_synthetic)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimiser steps per config and run (default 600; 1500 with --device-data)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; 7 with --device-data)")
    p.add_argument("--seconds", type=float, default=10.0, help="per run: fewer steps for slow models")
    harness.add_out(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--ab", default="", metavar="KEY=V1,V2",
                      help="compare values of one config key through fit (e.g. data.prefetch=0,2)")
    mode.add_argument("--device-data", action="store_true",
                      help="the hand loop with NumPy batches against device-resident data")
    args = p.parse_args(argv)
    if args.ab and ("=" not in args.ab or not args.ab.split("=", 1)[1]):
        p.error(f"--ab expects KEY=V1,V2,..., got {args.ab!r}")
    steps = args.steps or (1500 if args.device_data else 600)
    rounds = args.rounds or (7 if args.device_data else 2)
    paths = config_paths(p, harness.names(args.configs), DEVICE_DATA_CONFIGS if args.device_data else "")
    started = harness.start()
    if args.device_data:
        rows = measure_device_data(paths, steps, rounds)
        result = {**harness.finish(started, __spec__.name, argv), "steps": steps, "rounds": rounds, "configs": rows}
        harness.write_result(args.out, "device_data", result, "")
        return 0
    if args.ab:
        key, values = args.ab.split("=", 1)
        values = harness.names(values)
        rows = measure_ab(paths, key, values, steps, rounds, args.seconds)
    else:
        rows = measure(paths, steps, rounds, args.seconds)
    result = {**harness.finish(started, __spec__.name, argv), "steps": steps, "rounds": rounds,
              "seconds": args.seconds, "configs": rows}
    if args.ab:
        result.update(key=key, values=values)
    md = markdown_ab(result) if args.ab else markdown(result)
    print(md)
    harness.write_result(args.out, "end_to_end_ab" if args.ab else "end_to_end", result, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
