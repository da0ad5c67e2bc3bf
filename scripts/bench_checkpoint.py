#!/usr/bin/env python
"""What a checkpoint costs a training run: async vs synchronous saves, through the real ``fit``.

    python scripts/bench_checkpoint.py [--config configs/mnist1d_cnn.toml] [--steps 1000] [--every 100]
                                       [--rounds 5] [--saves 20] [--out FILE.json]

Part 1 (end to end): ``fundl.run.experiment.run`` (what ``scripts/train.py``
runs) of ``--config`` for ``--steps`` steps into a fresh run directory,
three ways, in interleaved rounds in one process:

* ``none``: no checkpoint during the run (``training.checkpoint_every = 0``;
  the final one is not timed);
* ``sync``: a checkpoint every ``--every`` steps, each save blocking until
  committed (``training.async_checkpoints = false``);
* ``async``: the same checkpoints written in the background
  (``training.async_checkpoints = true``).

The time is read from ``metrics.jsonl``, from the first logged train record
to the last (so compilation and the final evaluation and checkpoint are not
counted; the checkpoints at steps ``every, 2 every, ..., last log - every``
are).  Reported: the median time per round, and the cost of one checkpoint:
the median over rounds of ``(time - none's time) / checkpoints``.

Part 2 (one save alone, ``--saves`` times, medians) of the same model's
train state: Orbax's own save (``AsyncCheckpointer`` save + wait, no fundl),
fundl's synchronous save (Orbax + checksums, fsync, manifest, rename),
the part of fundl's async save that blocks the caller, and, for comparison, a
format-1 style write (``np.savez`` + fsync + sha256 + rename: what fundl did
before Orbax).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed_run(config: dict, steps: int, every: int, mode: str) -> tuple[float, int]:
    """Seconds from the first logged train record to the last, and checkpoints written in between."""
    from fundl.run import config as cfg
    from fundl.run import experiment
    from fundl.run.rundir import read_metrics

    t = {**config["training"], "steps": steps, "progress": False, "eval_every": 0,
         "checkpoint_every": 0 if mode == "none" else every, "async_checkpoints": mode == "async",
         "keep_checkpoints": 3}
    schedule = {**config["schedule"], "warmup_steps": min(config["schedule"]["warmup_steps"], steps // 10)}
    short = cfg.validate({**config, "training": t, "schedule": schedule,
                          "logging": {**config["logging"], "plots": False, "tensorboard": False}})
    with tempfile.TemporaryDirectory(prefix="fundl-bench-ckpt-") as tmp:
        experiment.run(short, Path(tmp) / "run", verbose=False)
        train = [r for r in read_metrics(Path(tmp) / "run") if r["split"] == "train"]
    first, last = train[0], train[-1]
    saves = 0 if mode == "none" else len(range(-(-first["step"] // every) * every, last["step"], every))
    return last["wall_time"] - first["wall_time"], saves


def end_to_end(config: dict, steps: int, every: int, rounds: int) -> dict:
    times = {m: [] for m in ("none", "sync", "async")}
    saves = 0
    timed_run(config, 2 * config["training"]["log_every"], every, "async")  # warm up: data, imports, compiles
    for rnd in range(rounds):
        order = ["none", "sync", "async"] if rnd % 2 == 0 else ["async", "sync", "none"]
        for mode in order:
            seconds, n = timed_run(config, steps, every, mode)
            times[mode].append(seconds)
            saves = max(saves, n)
            print(f"round {rnd + 1}/{rounds} {mode}: {seconds:.3f} s ({n} checkpoints)", file=sys.stderr, flush=True)
    out = {"saves_per_run": saves, "seconds": times,
           "median_seconds": {m: statistics.median(v) for m, v in times.items()}}
    for mode in ("sync", "async"):
        per_round = [(t - n) / saves for t, n in zip(times[mode], times["none"])]
        out[f"{mode}_ms_per_checkpoint"] = 1e3 * statistics.median(per_round)
    return out


def _format1_save(directory: Path, arrays: dict, step: int) -> None:
    """fundl's format-1 write path (before Orbax), for comparison: npz, fsync, sha256, manifest, rename."""
    import hashlib

    import numpy as np

    tmp = directory / f".step_{step:08d}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    with open(tmp / "arrays.npz", "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    digest = hashlib.sha256((tmp / "arrays.npz").read_bytes()).hexdigest()
    with open(tmp / "manifest.json", "w") as f:
        json.dump({"format": 1, "step": step, "sha256": digest}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / f"step_{step:08d}")


def single_saves(config: dict, n: int) -> dict:
    """Median milliseconds of one save of the config's train state, four ways."""
    import jax

    from fundl.run import experiment
    from fundl.train import checkpoint as ckpt

    data = experiment.load_data(config)
    _, _, state = experiment.initial_state(config, data, 10)
    state = jax.device_put(state)
    tree = ckpt._nest({k: v for k, v in ((ckpt._path_str(p), ckpt._leaf_data(x)) for p, x in
                                         jax.tree_util.tree_flatten_with_path(state)[0])})
    arrays = ckpt.flatten_state(state)
    times = {"orbax_alone": [], "fundl_sync": [], "fundl_async_blocking": [], "fundl_async_total": [],
             "format1_npz": []}
    import orbax.checkpoint as ocp

    with tempfile.TemporaryDirectory(prefix="fundl-bench-save-") as tmp:
        tmp = Path(tmp)
        orbax = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
        sync = ckpt.Checkpointer(tmp / "sync", keep=2, async_save=False)  # as fit holds them: one per run
        saver = ckpt.Checkpointer(tmp / "async", keep=2)

        def orbax_alone(i):
            t0 = time.perf_counter()
            orbax.save(tmp / "orbax" / str(i), args=ocp.args.StandardSave(tree))
            orbax.wait_until_finished()
            times["orbax_alone"].append(time.perf_counter() - t0)
            shutil.rmtree(tmp / "orbax" / str(i))

        def fundl_sync(i):
            t0 = time.perf_counter()
            sync.save(state, step=i)
            times["fundl_sync"].append(time.perf_counter() - t0)

        def fundl_async(i):
            t0 = time.perf_counter()
            saver.save(state, step=i)
            t1 = time.perf_counter()
            saver.wait()
            times["fundl_async_blocking"].append(t1 - t0)
            times["fundl_async_total"].append(time.perf_counter() - t0)

        def format1(i):
            t0 = time.perf_counter()
            _format1_save(tmp / "npz", arrays, i)
            times["format1_npz"].append(time.perf_counter() - t0)
            shutil.rmtree(tmp / "npz" / f"step_{i:08d}")

        ways = [orbax_alone, fundl_sync, fundl_async, format1]
        for i in range(n + 1):  # the first of each is a warm-up (dropped below); the order rotates
            for way in ways[i % 4:] + ways[:i % 4]:
                way(i)
        orbax.close()
        sync.close()
        saver.close()
    times = {k: [1e3 * t for t in v[1:]] for k, v in times.items()}
    leaves = jax.tree.leaves(state)
    return {"leaves": len(leaves), "bytes": int(sum(x.size * x.dtype.itemsize for x in (
        jax.random.key_data(v) if jax.numpy.issubdtype(v.dtype, jax.dtypes.prng_key) else v for v in leaves))),
            "median_ms": {k: statistics.median(v) for k, v in times.items()}}


def markdown(result: dict) -> str:
    e, s = result["end_to_end"], result["single_save"]
    med = e["median_seconds"]
    lines = [f"{result['date']}, load {result['load_start']} -> {result['load_end']}, `{result['command']}`", "",
             f"End to end ({result['steps']} steps, a checkpoint every {result['every']}: {e['saves_per_run']} timed "
             f"checkpoints per run; median of {result['rounds']} interleaved rounds):", "",
             "| checkpoints | run time (s) | cost per checkpoint (ms) |", "|---|---:|---:|",
             f"| none | {med['none']:.3f} | - |",
             f"| synchronous | {med['sync']:.3f} | {e['sync_ms_per_checkpoint']:.1f} |",
             f"| async | {med['async']:.3f} | {e['async_ms_per_checkpoint']:.1f} |", "",
             f"One save of the train state alone ({s['leaves']} leaves, {s['bytes']:,} bytes; median of "
             f"{result['saves']}):", "",
             "| save | ms |", "|---|---:|"]
    names = {"orbax_alone": "Orbax alone (AsyncCheckpointer save + wait)",
             "fundl_sync": "fundl synchronous (Orbax + checksums, fsync, manifest, rename, keep-K)",
             "fundl_async_blocking": "fundl async: the part that blocks the training loop",
             "fundl_async_total": "fundl async: until committed",
             "format1_npz": "format 1 (np.savez + fsync + sha256 + rename), for comparison"}
    lines += [f"| {names[k]} | {v:.1f} |" for k, v in s["median_ms"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "mnist1d_cnn.toml"))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--saves", type=int, default=20, help="repetitions of the single-save timings")
    p.add_argument("--out", help="also write the result as JSON here")
    args = p.parse_args(argv)

    from fundl.run import config as cfg

    config = cfg.load_config(args.config)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "load_start": round(os.getloadavg()[0], 2), "command": " ".join(["python", *sys.argv]),
              "steps": args.steps, "every": args.every, "rounds": args.rounds, "saves": args.saves}
    result["single_save"] = single_saves(config, args.saves)
    result["end_to_end"] = end_to_end(config, args.steps, args.every, args.rounds)
    result["load_end"] = round(os.getloadavg()[0], 2)
    print(markdown(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
