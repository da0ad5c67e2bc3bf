"""What a checkpoint costs a training run: async vs synchronous saves, through the real ``fit``.

    python -m benchmarks.bench_checkpoint [--config configs/mnist1d_cnn.toml] [--steps 1000] [--every 100]
                                          [--rounds 5] [--saves 20] [--out DIR]

Part 1 (end to end): ``fundl.run.experiment.run`` (what ``scripts/train.py``
runs) of ``--config`` for ``--steps`` steps into a fresh run directory,
three ways, in interleaved rounds in one process (``benchmarks.bench_end_to_end.time_fit``):

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
before Orbax).  docs/fault_tolerance.md records the runs.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

from benchmarks import bench_end_to_end as e2e
from benchmarks import harness

MODES = ("none", "sync", "async")


def timed_run(config: dict, steps: int, every: int, mode: str, min_logs: int = 3) -> tuple[float, int]:
    """Seconds from the first logged train record to the last, and checkpoints written in between."""
    timing = e2e.time_fit(config, steps, min_logs=min_logs, eval_every=0,
                          checkpoint_every=0 if mode == "none" else every, async_checkpoints=mode == "async",
                          keep_checkpoints=3)
    first, last = timing.first_step, timing.first_step + timing.steps
    saves = 0 if mode == "none" else len(range(-(-first // every) * every, last, every))
    return timing.seconds, saves


def end_to_end(config: dict, steps: int, every: int, rounds: int) -> dict:
    timed_run(config, 2 * config["training"]["log_every"], every, "async", min_logs=1)  # warm up: imports, compiles
    saves = []

    def run(mode):
        seconds, n = timed_run(config, steps, every, mode)
        saves.append(n)
        return seconds

    def progress(rnd, figures):
        print(f"round {rnd + 1}/{rounds}: " + ", ".join(f"{m} {figures[m][-1]:.3f} s" for m in MODES),
              file=sys.stderr, flush=True)

    times = harness.interleaved({m: (lambda m=m: run(m)) for m in MODES}, rounds, progress)
    n = max(saves)
    out = {"saves_per_run": n, "seconds": times, "median_seconds": {m: statistics.median(v) for m, v in times.items()}}
    for mode in ("sync", "async"):
        per_round = [(t - base) / n for t, base in zip(times[mode], times["none"])]
        out[f"{mode}_ms_per_checkpoint"] = 1e3 * statistics.median(per_round)
    return out


def saved_tree(state) -> dict:
    """The train state as nested dicts of its arrays (typed PRNG keys as their key data): what
    Orbax is given to save, for the Orbax-alone baseline."""
    import jax

    tree = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if jax.numpy.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        *parents, name = jax.tree_util.keystr(path, simple=True, separator="/").split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = leaf
    return tree


def flat(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}``."""
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
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
    import numpy as np

    from fundl.train import checkpoint as ckpt

    _, _, state, _ = e2e.setup(config)
    state = jax.device_put(state)
    tree = saved_tree(state)
    arrays = {k: np.asarray(v) for k, v in flat(tree).items()}  # the format-1 write saves NumPy arrays
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
            for way in harness.rotated(ways, i):
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
    lines = [harness.header(result), "",
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
    p = harness.parser(__doc__, __spec__.name)
    p.add_argument("--config", default=str(harness.CONFIGS / "mnist1d_cnn.toml"))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=100, help="steps between checkpoints")
    harness.add_rounds(p, 5)
    p.add_argument("--saves", type=int, default=20, help="repetitions of the single-save timings")
    harness.add_out(p)
    args = p.parse_args(argv)

    from fundl.run import config as cfg

    config = cfg.load_config(args.config)
    started = harness.start()
    single = single_saves(config, args.saves)
    e2e_result = end_to_end(config, args.steps, args.every, args.rounds)
    result = {**harness.finish(started, __spec__.name, argv), "steps": args.steps, "every": args.every,
              "rounds": args.rounds, "saves": args.saves, "single_save": single, "end_to_end": e2e_result}
    md = markdown(result)
    print(md)
    harness.write_result(args.out, "checkpoint", result, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
