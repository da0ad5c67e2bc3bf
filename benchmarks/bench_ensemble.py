"""An 8-member ensemble through the CLI against the same 8 runs as separate CLI invocations.

    python -m benchmarks.bench_ensemble [--members 8] [--steps 1500] [--models mlp,cnn] [--out DIR]

For the MNIST-1D MLP (``configs/mnist1d_cnn.toml`` with ``model.kind = "mlp"``,
``hidden = [100, 100]``) and the MNIST-1D CNN (the main job's config), each
shortened to ``--steps`` steps, times as a user would, with ``scripts/train.py``
in fresh processes:

* ``ensemble``: one run with ``training.ensemble = M`` (members batched on one device);
* ``ensemble, sharded``: the same on 2 CPU devices (``--local-devices 2``,
  ``parallel.mode = "sharding"``), members replicated (``member_devices = 1``)
  and members split over the devices (``member_devices = 2``);
* ``separate``: M runs, seeds 0..M-1, one after another.

Reported: wall time from command to result and training throughput inside
``fit`` in model-steps/s (M × steps over the runs' ``train_seconds``), each
against separate runs, beside the issue's targets.  The runs are not
interleaved: each is a whole process, so rerun to see the spread.
docs/ensembles.md records the runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness

ROOT = harness.REPO_ROOT
MODELS = {
    "mlp": ["--set", 'model.kind="mlp"', "--set", "model.hidden=[100, 100]", "--set", "model.batch_norm=false"],
    "cnn": [],
}


def train(run_dir: Path, model: str, steps: int, *extra: str) -> tuple[float, dict]:
    """Wall seconds of one ``scripts/train.py`` process and its summary."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "mnist1d_cnn.toml"),
           "--run-dir", str(run_dir), "--quiet", "--set", f"training.steps={steps}", "--set", "logging.plots=false",
           *MODELS[model], *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return wall, json.loads((run_dir / "summary.json").read_text())


def measure(model: str, members: int, steps: int, tmp: Path) -> dict:
    rows = {}
    variants = {
        "ensemble": ("--set", f"training.ensemble={members}"),
        "ensemble, 2 devices, members replicated": (
            "--set", f"training.ensemble={members}", "--local-devices", "2", "--set", 'parallel.mode="sharding"',
            "--set", "parallel.member_devices=1"),
        "ensemble, 2 devices, members split": (
            "--set", f"training.ensemble={members}", "--local-devices", "2", "--set", 'parallel.mode="sharding"',
            "--set", "parallel.member_devices=2"),
    }
    for name, extra in variants.items():
        wall, s = train(tmp / f"{model}-{len(rows)}", model, steps, *extra)
        rows[name] = {"wall_s": wall, "train_s": s["train_seconds"], "model_steps_per_s": members * steps / s["train_seconds"],
                      "ensemble_test_accuracy": s.get("ensemble_test_accuracy")}
        print(f"{model} {name}: {wall:.1f} s wall, {s['train_seconds']:.1f} s in fit", file=sys.stderr, flush=True)
    walls, trains, accs = [], [], []
    for seed in range(members):
        wall, s = train(tmp / f"{model}-seed{seed}", model, steps, "--set", f"training.seed={seed}")
        walls.append(wall)
        trains.append(s["train_seconds"])
        accs.append(s["test_accuracy"])
    rows["separate"] = {"wall_s": sum(walls), "train_s": sum(trains), "model_steps_per_s": members * steps / sum(trains),
                        "mean_member_test_accuracy": sum(accs) / len(accs)}
    print(f"{model} separate: {sum(walls):.1f} s wall", file=sys.stderr, flush=True)
    sep = rows["separate"]
    for row in rows.values():
        row["wall_vs_separate"] = row["wall_s"] / sep["wall_s"]
        row["throughput_vs_separate"] = row["model_steps_per_s"] / sep["model_steps_per_s"]
    return rows


def markdown(result: dict) -> str:
    rows = [[model, name, f"{r['wall_s']:.1f}", f"{r['wall_vs_separate']:.2f}", f"{r['train_s']:.1f}",
             f"{r['model_steps_per_s']:,.0f}", f"{r['throughput_vs_separate']:.2f}"]
            for model, by_name in result["models"].items() for name, r in by_name.items()]
    return (f"{result['members']} members, {result['steps']} steps each; " + harness.header(result) + "\n\n" +
            harness.markdown_table(["model", "how", "wall s", "wall / separate (target ≤ 0.5)", "fit s",
                                    "model-steps/s in fit", "throughput / separate (target ≥ 1.0)"], rows, "llrrrrr"))


def main(argv=None) -> int:
    p = harness.parser(__doc__, __spec__.name)
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--models", default="mlp,cnn")
    harness.add_out(p)
    args = p.parse_args(argv)
    started = harness.start()
    with tempfile.TemporaryDirectory(prefix="fundl-ens-") as tmp:
        models = {m: measure(m, args.members, args.steps, Path(tmp)) for m in harness.names(args.models)}
    result = {**harness.finish(started, __spec__.name, argv), "members": args.members, "steps": args.steps,
              "models": models}
    md = markdown(result)
    print(md)
    harness.write_result(args.out, "ensemble", result, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
