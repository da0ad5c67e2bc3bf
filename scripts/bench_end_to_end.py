#!/usr/bin/env python
"""End-to-end speed: every shipped config through the real ``fit``, beside its bare step.

    python scripts/benchmark.py --end-to-end [--steps 600] [--rounds 2] [--configs a,b] [--out DIR]
    python scripts/bench_end_to_end.py ...            (the same)
    python scripts/bench_end_to_end.py --ab data.prefetch=0,2 [--configs a,b] [--rounds 5]

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
  the device, nothing else (what ``scripts/benchmark.py`` times);
* ``hand``: the loop a user writes by hand in plain JAX: shuffled NumPy
  batches, one jitted donated step per batch, the loss fetched every 100
  steps (no evaluation, no checkpoints).

``--ab KEY=V1,V2,...`` instead runs only ``fit``, once per value of one config
key in every round (order rotated per round), and reports each value's median
examples/s and its ratio to the first value's: how defaults are chosen, by
measurement through the real entry point.

Reported: the median examples/s of each, ``fit/bare`` (target >= 0.9) and
``hand time / fit time`` (target: fit takes at most 1.15x the hand loop's
time, i.e. a ratio >= 0.87).  Configs whose data are not on this machine are
skipped with the reason.  ``tiny_synthetic`` (the tests' fixture, which
evaluates and checkpoints every 12 steps on purpose), ensemble or sweep
configs (``scripts/bench_ensemble.py`` measures those) and DP-SGD configs
(whose step is another program than the bare step here) run only when named.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _setup(config: dict):
    """Data, loader, initial state and train step of a config, built as ``fundl.run.experiment`` builds them."""
    from fundl.run import experiment
    from fundl.data import Loader
    from fundl.losses import softmax_cross_entropy
    from fundl.metrics import classification_metrics
    from fundl.train.step import make_train_step

    t = config["training"]
    data = experiment.load_data(config)
    loader = Loader(data.train, t["batch_size"], seed=t["seed"], drop_last=True, prefetch=0)
    model, opt, state = experiment.initial_state(config, data, loader.steps_per_epoch)
    step = make_train_step(model, opt, softmax_cross_entropy, classification_metrics(),
                           compute_dtype=t["compute_dtype"], loss_scale=t["loss_scale"] or None)
    return data, loader, state, step


def time_bare(config: dict, steps: int) -> float:
    """Seconds for ``steps`` calls of the jitted, donated step on one device-resident batch."""
    import jax

    _, loader, state, step = _setup(config)
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
    example indices and gathering them itself (``scripts/bench_device_data.py``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    data, loader, state, step = _setup(config)
    x, y, b = data.train["x"], data.train["y"], loader.batch_size
    if device_data:
        arrays = jax.device_put({"x": x, "y": y})
        gather = jax.jit(lambda s, arrays, ids: step(s, {k: jnp.take(v, ids, axis=0) for k, v in arrays.items()}),
                         donate_argnums=0)
        f = lambda s, ids: gather(s, arrays, ids)
    else:
        jitted = jax.jit(step, donate_argnums=0)
        f = lambda s, ids: jitted(s, {"x": x[ids], "y": y[ids]})  # the batch gathered by NumPy
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


def load_configs(config_paths: list[Path]) -> tuple[dict, dict]:
    """``({name: config}, {name: row})``: the configs whose data are on this machine, and a row per
    config in ``config_paths``' order, empty to fill in, or ``{"skipped": reason}``."""
    from fundl.run import config as cfg
    from fundl.data.errors import DataNotFoundError

    configs, rows = {}, {}
    for path in config_paths:
        config = cfg.load_config(path)
        try:
            _setup(config)  # loads the data: skip what is not on this machine
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


def measure_ab(config_paths: list[Path], key: str, values: list[str], steps: int, rounds: int,
               seconds: float) -> dict:
    """Seconds of ``fit`` per value of ``key``, interleaved, in every round."""
    loaded, rows = load_configs(config_paths)
    configs = {name: {v: with_setting(config, key, v) for v in values} for name, config in loaded.items()}
    for name, config in loaded.items():
        rows[name].update({"steps": calibrated_steps(config, steps, seconds), "batch_size":
                           config["training"]["batch_size"], **{v: [] for v in values}})
    for rnd in range(rounds):
        order = values[rnd % len(values):] + values[:rnd % len(values)]
        for name, variants in configs.items():
            row = rows[name]
            for v in order:
                secs, n, _ = time_fit(variants[v], row["steps"])
                row[v].append(secs)
                row["timed_steps"] = n
            print(f"round {rnd + 1}/{rounds} {name}: " + ", ".join(f"{key}={v} {row[v][-1]:.2f} s" for v in values),
                  file=sys.stderr, flush=True)
    for name in configs:
        row = rows[name]
        row["examples_per_s"] = {v: row["timed_steps"] * row["batch_size"] / statistics.median(row[v])
                                 for v in values}
        row["ratio_to_first"] = {v: statistics.median(a / b for a, b in zip(row[values[0]], row[v]))
                                 for v in values}
    return rows


def markdown_ab(result: dict) -> str:
    key, values = result["key"], result["values"]
    lines = [f"`fit` examples/s by `{key}`, up to {result['steps']} steps per config, median of {result['rounds']} "
             f"interleaved rounds; {result['date']}, load {result['load_start']} -> {result['load_end']}; "
             f"`{result['command']}`", "",
             "| config | " + " | ".join(f"{key}={v}" for v in values) + " | " +
             " | ".join(f"{v} / {values[0]}" for v in values[1:]) + " |",
             "|---|" + "---:|" * (2 * len(values) - 1)]
    for name, row in result["configs"].items():
        if "skipped" in row:
            lines.append(f"| {name} | skipped: {row['skipped']} |" + " |" * (2 * len(values) - 2))
            continue
        lines.append(f"| {name} | " + " | ".join(f"{row['examples_per_s'][v]:,.0f}" for v in values) + " | " +
                     " | ".join(f"{row['ratio_to_first'][v]:.2f}" for v in values[1:]) + " |")
    return "\n".join(lines)


def run_fit(config: dict, steps: int) -> tuple[dict, list[dict]]:
    """``fundl.run.experiment.run`` for ``steps`` steps in a fresh run directory: its summary and records."""
    from fundl.run.rundir import read_metrics

    from fundl.run import config as cfg
    from fundl.run import experiment

    schedule = dict(config["schedule"])
    schedule["warmup_steps"] = min(schedule["warmup_steps"], steps // 10)  # a shortened run keeps a valid schedule
    short = cfg.validate({**config, "training": {**config["training"], "steps": steps, "progress": False},
                          "logging": {**config["logging"], "plots": False, "tensorboard": False},
                          "schedule": schedule})
    with tempfile.TemporaryDirectory(prefix="fundl-e2e-") as tmp:
        summary = experiment.run(short, Path(tmp) / "run", verbose=False)
        return summary, read_metrics(Path(tmp) / "run")


def time_fit(config: dict, steps: int) -> tuple[float, int, dict]:
    """Seconds and steps of a run from its first logged train record to its last, and its summary."""
    summary, records = run_fit(config, steps)
    train = [r for r in records if r["split"] == "train"]
    if len(train) < 3:
        raise ValueError(f"{steps} steps give {len(train)} train logs; need 3 (raise --steps or lower log_every)")
    return train[-1]["wall_time"] - train[0]["wall_time"], train[-1]["step"] - train[0]["step"], summary


def calibrated_steps(config: dict, steps: int, seconds: float) -> int:
    """``steps``, or fewer when the bare step would take longer than ``seconds`` (at least three log
    intervals, so that two are timed)."""
    rate = 20 / time_bare(config, 20)
    log = config["training"]["log_every"]
    return max(3 * log, min(steps, int(rate * seconds) // log * log))


def measure(config_paths: list[Path], steps: int, rounds: int, seconds: float = 10.0) -> dict:
    configs, rows = load_configs(config_paths)
    for name, config in configs.items():
        rows[name].update(bare=[], hand=[], fit=[], batch_size=config["training"]["batch_size"],
                          steps=calibrated_steps(config, steps, seconds))
    for rnd in range(rounds):
        for name, config in configs.items():
            row = rows[name]
            seconds, n, summary = time_fit(config, row["steps"])
            row["fit"].append(seconds)
            row["bare"].append(time_bare(config, n))  # the same number of steps as the timed part of fit
            row["hand"].append(time_hand(config, n))
            row["timed_steps"] = n
            row.update(steps_per_call=summary["steps_per_call"], unroll=summary["unroll"],
                       compile_s=summary["compile_seconds"])
            print(f"round {rnd + 1}/{rounds} {name}: bare {row['bare'][-1]:.2f} s, hand {row['hand'][-1]:.2f} s, "
                  f"fit {row['fit'][-1]:.2f} s", file=sys.stderr, flush=True)
    for name in configs:
        row = rows[name]
        b = row["batch_size"]
        for k in ("bare", "hand", "fit"):
            row[f"{k}_examples_per_s"] = row["timed_steps"] * b / statistics.median(row[k])
        # ratios of medians of per-round ratios: drift within a round hits all three alike
        row["fit_over_bare"] = statistics.median(bt / ft for bt, ft in zip(row["bare"], row["fit"]))
        row["hand_time_over_fit_time"] = statistics.median(ht / ft for ht, ft in zip(row["hand"], row["fit"]))
    return rows


def markdown(result: dict) -> str:
    lines = [f"End to end, up to {result['steps']} steps per config (fewer where the bare step would take over "
             f"{result['seconds']:g} s), median of {result['rounds']} interleaved rounds; "
             f"{result['date']}, load {result['load_start']} -> {result['load_end']}; `{result['command']}`", "",
             "| config | steps | steps/call, unroll | bare step ex/s | fit ex/s | fit / bare (target ≥ 0.9) | "
             "hand-loop ex/s | fit time / hand time (target ≤ 1.15) |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for name, row in result["configs"].items():
        if "skipped" in row:
            lines.append(f"| {name} | skipped: {row['skipped']} | | | | | | |")
            continue
        lines.append(
            f"| {name} | {row['steps']} | {row['steps_per_call']}, {row['unroll']} | {row['bare_examples_per_s']:,.0f} | "
            f"{row['fit_examples_per_s']:,.0f} | {row['fit_over_bare']:.2f} | {row['hand_examples_per_s']:,.0f} | "
            f"{1 / row['hand_time_over_fit_time']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="",
                   help="comma-separated config names (default: every configs/*.toml but tiny_synthetic)")
    p.add_argument("--steps", type=int, default=600, help="optimiser steps per config and run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=10.0, help="per run: fewer steps for slow models")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--ab", default="", metavar="KEY=V1,V2",
                   help="compare values of one config key through fit (e.g. data.prefetch=0,2)")
    args = p.parse_args(argv)
    if args.ab and ("=" not in args.ab or not args.ab.split("=", 1)[1]):
        p.error(f"--ab expects KEY=V1,V2,..., got {args.ab!r}")
    names = [n for n in args.configs.split(",") if n]
    paths = sorted((ROOT / "configs").glob("*.toml"))
    if names:
        unknown = sorted(set(names) - {q.stem for q in paths})
        if unknown:
            p.error(f"unknown config(s) {unknown}; choose from {[q.stem for q in paths]}")
        paths = [q for q in paths if q.stem in names]
    else:  # the tests' fixture and the ensemble/sweep variants of other configs (bench_ensemble.py) only when named
        from fundl.run import config as cfg

        def plain(q):
            c = cfg.load_config(q)
            return c["training"]["ensemble"] == 1 and not c["training"]["sweep"] and not c["privacy"]["enabled"]

        paths = [q for q in paths if q.stem != "tiny_synthetic" and plain(q)]
    load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    t0 = time.perf_counter()
    if args.ab:
        key, values = args.ab.split("=", 1)
        values = values.split(",")
        rows = measure_ab(paths, key, values, args.steps, args.rounds, args.seconds)
    else:
        rows = measure(paths, args.steps, args.rounds, args.seconds)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": args.steps,
              "rounds": args.rounds, "seconds": args.seconds, "load_start": load_start,
              "load_end": " ".join(f"{v:.2f}" for v in os.getloadavg()),
              "command": " ".join(["bench_end_to_end.py"] + (sys.argv[1:] if argv is None else list(argv))),
              "wall_s": time.perf_counter() - t0, "configs": rows}
    if args.ab:
        result.update(key=key, values=values)
    md = markdown_ab(result) if args.ab else markdown(result)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "end_to_end_ab" if args.ab else "end_to_end"
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
        (args.out / f"{stem}.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
