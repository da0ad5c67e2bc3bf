"""Time to first step, cold and warm, beside the JAX peers; and ``make train``'s first and second run.

    python -m benchmarks.bench_first_step [--models mlp,cnn,lstm] [--impls fundl,linen,nnx,equinox,haiku,stax]
                                          [--rounds 3] [--train-rounds 2] [--config configs/mnist1d_cnn.toml]
                                          [--no-train] [--out DIR]

First step: seconds from building the model (init included) to the end of its first training
step, compile included, in a fresh process after its imports and JAX's backend start-up
(``python -m benchmarks.benchmark --_probe MODEL:IMPL``, the models and steps of
``benchmarks.peers``).  *Cold*: a fresh process on an empty persistent compilation cache;
*warm*: one more fresh process on the cache the cold one filled.  fundl uses its default cache
(``fundl.train.compile_cache``, here ``FUNDL_CACHE_DIR`` set to a fresh folder); the peers get
JAX's cache set by hand the same way (``JAX_COMPILATION_CACHE_DIR``, every program kept), so
their warm figures are what a user who configures the cache gets.  Rounds interleave the
implementations (the order rotated each round); figures are medians over rounds, and "cold /
fastest peer" is the median over rounds of fundl's cold time over the fastest JAX peer's in
that round.

Train: ``scripts/train.py --config CONFIG --overwrite`` (what ``make train`` runs) twice in a
fresh home directory (``HOME`` and ``XDG_CACHE_HOME`` under a temporary folder), whose
MNIST-1D data cache is filled first, so that only compiling differs between the runs: the
wall time of each run and the second's over the first.

docs/benchmarks.md, "First step", records the runs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.peers import SPECS, available

PEERS_JAX = ("linen", "nnx", "equinox", "haiku", "stax")
CACHE_ENV = ("JAX_COMPILATION_CACHE_DIR", "FUNDL_CACHE_DIR", "FUNDL_COMPILATION_CACHE", "XDG_CACHE_HOME",
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


def clean_env(**extra) -> dict:
    """This environment without any compilation-cache setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in CACHE_ENV}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cache_env(impl: str, folder: Path) -> dict:
    """fundl: its default cache in ``folder``; a peer: JAX's cache there, every program kept."""
    if impl.startswith("fundl"):
        return clean_env(FUNDL_CACHE_DIR=folder)
    return clean_env(JAX_COMPILATION_CACHE_DIR=folder / "compilation", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0)


def first_step(model: str, impl: str, env: dict) -> float | None:
    """One probe process: its first step in seconds (None if it failed)."""
    try:
        out = harness.run_module("benchmarks.benchmark", ["--_probe", f"{model}:{impl}", "--steps-per-call", 10],
                                 env=env, timeout=600)
        for line in out.stdout.splitlines()[::-1]:
            if line.startswith("{"):
                return json.loads(line)["first_step_s_cold"]
        print(f"{model}/{impl} failed: {out.stderr[-800:]}", file=sys.stderr)
    except (subprocess.TimeoutExpired, OSError, json.JSONDecodeError) as e:
        print(f"{model}/{impl} failed: {e}", file=sys.stderr)
    return None


def cold_and_warm(model: str, impl: str) -> tuple[float | None, float | None]:
    """A cold probe on an empty cache, then a warm one on the cache it filled."""
    with tempfile.TemporaryDirectory(prefix="fundl-first-step-") as tmp:
        env = cache_env(impl, Path(tmp))
        cold = first_step(model, impl, env)
        warm = first_step(model, impl, env) if cold is not None else None
    return cold, warm


def train_twice(config: str) -> tuple[float, float]:
    """``scripts/train.py --config CONFIG --overwrite`` twice in a fresh home (data cache filled
    first): the wall seconds of each run."""
    with tempfile.TemporaryDirectory(prefix="fundl-train-home-") as home:
        env = clean_env(HOME=home, XDG_CACHE_HOME=Path(home) / ".cache")
        fill = ("import sys, tomllib; from fundl.data import load_dataset; "
                "load_dataset(tomllib.load(open(sys.argv[1], 'rb'))['data']['name'])")
        subprocess.run([sys.executable, "-c", fill, config], cwd=harness.REPO_ROOT, env=env, check=True,
                       capture_output=True)
        walls = []
        for _ in range(2):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "scripts/train.py", "--config", config, "--overwrite", "--quiet",
                            "--run-dir", str(Path(home) / "run")], cwd=harness.REPO_ROOT, env=env, check=True,
                           capture_output=True)
            walls.append(time.perf_counter() - t0)
    return walls[0], walls[1]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(figures: dict, models: list[str], impls: list[str]) -> dict:
    """Per model and implementation: median cold and warm; fundl's cold over the fastest JAX peer's."""
    out = {}
    for m in models:
        rows = {}
        impls = [i for i in impls if (m, i) in figures]
        for i in impls:
            colds = [c for c, _ in figures[(m, i)]]
            rows[i] = {"cold_s": median(colds), "warm_s": median([w for _, w in figures[(m, i)]]), "cold_rounds": colds,
                       "warm_rounds": [w for _, w in figures[(m, i)]]}
        ratios = []
        for r in range(len(figures[(m, impls[0])])):
            peers = [figures[(m, p)][r][0] for p in impls if p in PEERS_JAX and figures[(m, p)][r][0] is not None]
            mine = figures.get((m, "fundl"), [(None, None)] * (r + 1))[r][0]
            if peers and mine is not None:
                ratios.append(mine / min(peers))
        peers = {p: rows[p]["cold_s"] for p in impls if p in PEERS_JAX and rows[p]["cold_s"] is not None}
        fastest = min(peers, key=peers.get) if peers else None
        out[m] = {"impls": rows, "fastest_peer": fastest, "fundl_cold_over_fastest_peer": median(ratios)}
    return out


def fmt(v, spec=".2f"):
    return "" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    lines = [harness.header(result), ""]
    impls = result["impls"]
    rows = []
    for m, s in result["first_step"].items():
        for i in [i for i in impls if i in s["impls"]]:
            r = s["impls"][i]
            rows.append([m, i, fmt(r["cold_s"]), fmt(r["warm_s"]),
                         fmt(s["fundl_cold_over_fastest_peer"]) + f" ({s['fastest_peer']})" if i == "fundl" else ""])
    lines.append(harness.markdown_table(["model", "impl", "cold first step s", "warm first step s",
                                         "fundl cold / fastest JAX peer"], rows, "llrrr"))
    t = result.get("train")
    if t:
        lines += ["", harness.markdown_table(
            ["config", "first run s", "second run s", "second / first"],
            [[t["config"], fmt(median(t["first"]), ".1f"), fmt(median(t["second"]), ".1f"), fmt(t["ratio"])]], "lrrr")]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = harness.parser(__doc__, __spec__.name)
    p.add_argument("--models", default="mlp,cnn,lstm")
    p.add_argument("--impls", default="fundl," + ",".join(PEERS_JAX))
    harness.add_rounds(p, 3)
    p.add_argument("--train-rounds", type=int, default=2, help="pairs of make-train runs (first, second)")
    p.add_argument("--config", default="configs/mnist1d_cnn.toml", help="the config make train runs")
    p.add_argument("--no-train", action="store_true", help="only the first-step table")
    harness.add_out(p)
    args = p.parse_args(argv)
    models = harness.names(args.models)
    impls = [i for i in harness.names(args.impls) if not available(i) or print(f"skipping {i}: {available(i)}",
                                                                               file=sys.stderr)]
    started = harness.start()
    pairs = [(m, i) for m in models for i in impls if not (i == "stax" and SPECS[m]["kind"] == "rnn")]  # no RNNs
    figures = harness.interleaved({pair: (lambda pair=pair: cold_and_warm(*pair)) for pair in pairs}, args.rounds,
                                  on_round=lambda r, f: print(f"round {r + 1} done", file=sys.stderr))
    result = harness.finish(started, __spec__.name, argv)
    result.update(impls=impls, rounds=args.rounds, first_step=summarise(figures, models, impls))
    if not args.no_train:
        runs = [train_twice(args.config) for _ in range(args.train_rounds)]
        result["train"] = {"config": args.config, "first": [a for a, _ in runs], "second": [b for _, b in runs],
                           "ratio": statistics.median(b / a for a, b in runs)}
    md = markdown(result)
    print(md)
    harness.write_result(args.out, "first_step", result, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
