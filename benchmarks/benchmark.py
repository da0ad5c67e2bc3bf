"""Training-step throughput of fundl against Flax (Linen, NNX), Equinox, Haiku, stax and PyTorch.

    python -m benchmarks.benchmark [--out DIR] [--models mlp,cnn,lstm,...] [--impls fundl,linen,...]
                                   [--rounds 5] [--slot 0.3] [--quick] [--unroll-study]
    python -m benchmarks.benchmark --end-to-end [--steps 600] [--rounds 2] [--configs ...] [--out DIR]

(``--end-to-end``: the shipped configs through the real ``fit``; see benchmarks/bench_end_to_end.py.)
With a nanoGPT checkout (``--nanogpt DIR`` or ``$NANOGPT_DIR``) the run ends with nanoGPT's CPU baby
recipe in fundl and in nanoGPT's model.py side by side (benchmarks/bench_nanogpt.py; ``--quick``: its quick mode).

The models and implementations are ``benchmarks.peers``' (its docstring says how each is
written).  ``--impls`` defaults to fundl's four rows and every peer; ``fundl_loss_only`` and
``fundl_tuple`` (which parts of fundl's step cost what beside stax's) run when named.

Method.  All implementations are built, compiled and warmed up; the *time to first step* is
measured from the start of building (model init included) to the end of the first step
(compile included), after one process-wide warm-up so nobody pays for backend start-up.  Then
``--rounds`` rounds run every implementation in turn (``benchmarks.harness.interleaved``: the
order rotated each round) for about ``--slot`` seconds each, blocking at the end of each slot;
steps/s are reported as the median, min and max over rounds, with the ratio to fundl (per
step) as the median of the per-round ratios.  GFLOP/s use XLA's own FLOP count of the fundl
training step (``jit(...).lower(...).compile().cost_analysis()``; recurrent models counted on a
fully unrolled copy before optimisation, since XLA counts a loop body once) for every
implementation of that model, so they are throughput in common units; %peak divides by the
float32 matmul rate measured at start-up (a jitted 2048x2048 ``jnp.dot``).  Memory is the peak
resident-set growth of a fresh process (Linux ``VmHWM``, reset after the imports) that builds
the implementation and runs 3 steps, compilation included (``--memory``, on by default except
with ``--quick``); JAX rows also give XLA's ``memory_analysis`` (arguments + outputs +
temporaries - aliased) for the step.

Output: a markdown table on stdout, and with ``--out DIR`` ``DIR/benchmark.json`` and
``DIR/benchmark.md``.  docs/benchmarks.md records the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

from benchmarks import harness
from benchmarks.peers import (ALL_IMPLS, ALL_MODELS, BATCH, DEFAULT_IMPLS, FUSED_UNROLL, LR, SPECS,
                              available, build, fundl_model, library_modules, synthetic_batch)

PEERS_JAX = ("linen", "nnx", "equinox", "haiku", "stax")
PEERS = PEERS_JAX + ("torch", "torch_1t")


# ---------------------------------------------------------------------------
# Measurements


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    """float32 matmul rate of this machine through XLA, GFLOP/s (median of ``reps``)."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def model_flops(spec) -> float | None:
    """XLA's FLOP count of one fundl training step (recurrent models fully unrolled)."""
    import jax
    import jax.numpy as jnp
    import optax
    from fundl.train.state import create_train_state
    from fundl.train.step import make_train_step

    unroll = spec["x"][0] if spec["kind"] == "rnn" else 1
    model = fundl_model(spec, unroll=unroll)
    opt = optax.adam(LR)
    state = create_train_state(model, opt, 0, (BATCH,) + tuple(spec["x"]))
    x, y = synthetic_batch(spec)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    try:
        lowered = jax.jit(make_train_step(model, opt)).lower(state, batch)
        # Compiling a fully unrolled recurrent step is slow: count those before XLA's passes.
        cost = lowered.cost_analysis() if unroll > 1 else lowered.compile().cost_analysis()
        if isinstance(cost, list):
            cost = cost[0]
        return float(cost["flops"])
    except Exception:  # noqa: BLE001
        return None


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux: ``clear_refs`` 5) and return the RSS in KiB.

    Without it the peak would still hold the high-water mark of the imports.
    Elsewhere falls back to ``ru_maxrss``.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss_kib() -> int:
    peak = _status_kib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def probe(model_name: str, impl: str, steps_per_call: int) -> dict:
    """Run in a fresh process: peak RSS growth and time to first step, cold."""
    spec = SPECS[model_name]
    import jax.numpy as jnp
    for mod in library_modules(impl):  # imports are not the first step's cost, for fundl as for the peers
        __import__(mod)
    (jnp.ones(3) + 1).block_until_ready()  # backend start-up is not the model's cost
    synthetic_batch(spec)
    base = _reset_peak_rss()
    t0 = time.perf_counter()
    runner = build(impl, spec, model_name, steps_per_call)
    runner.run(1)
    first = time.perf_counter() - t0
    runner.run(2)
    return {"peak_rss_mib": (_peak_rss_kib() - base) / 1024, "first_step_s_cold": first}


def run_probe_subprocess(model_name, impl, steps_per_call) -> dict | None:
    """``probe`` in a fresh ``python -m benchmarks.benchmark --_probe`` process (None if it failed)."""
    try:
        out = harness.run_module(__spec__.name, ["--_probe", f"{model_name}:{impl}", "--steps-per-call",
                                                 steps_per_call], timeout=300)
        for line in out.stdout.splitlines()[::-1]:
            if line.startswith("{"):
                return json.loads(line)
    except (subprocess.TimeoutExpired, OSError, json.JSONDecodeError):
        pass
    return None


# ---------------------------------------------------------------------------
# Tables


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores; float32 matmul peak (XLA, 2048²): "
             f"{m['matmul_peak_gflops']:.0f} GFLOP/s; load average at start {result['load_start']}, "
             f"end {result['load_end']}; XLA_FLAGS={m['xla_flags']!r}; "
             f"GLIBC_TUNABLES={m.get('glibc_tunables', '')!r} (fundl/run/hugepages.py); {result['date']}; "
             f"`{result['command']}`",
             f"Batch {BATCH}, float32, Adam; {result['rounds']} interleaved rounds of ~{result['slot_s']} s "
             f"per implementation; fused K={result['steps_per_call']}.", ""]
    rows = []
    for model_name, impls in result["models"].items():
        for impl, r in impls.items():
            if "skipped" in r:
                rows.append([model_name, impl, f"n/a ({r['skipped']})"] + [""] * 8)
                continue
            xla_mib = None if r.get("xla_memory_bytes") is None else r["xla_memory_bytes"] / 2**20
            rows.append([model_name, impl, f"{r['steps_per_s']:.0f}", f"{r['min']:.0f}", f"{r['max']:.0f}",
                         f"{r['ratio_to_fundl']:.2f}", _fmt(r.get("gflops"), ".1f"), _fmt(r.get("pct_peak"), ".1f"),
                         f"{r.get('first_step_s_cold', r['first_step_s']):.2f}", _fmt(r.get("peak_rss_mib"), ".0f"),
                         _fmt(xla_mib, ".1f")])
    lines.append(harness.markdown_table(
        ["model", "impl", "steps/s median", "min", "max", "× fundl", "GFLOP/s", "% peak", "first step s",
         "peak RSS MiB", "XLA mem MiB"], rows, "llrrrrrrrrr"))
    lines += ["", "First step: build + compile + first step, in a fresh process when memory probes ran "
              "(else in the benchmark process).", ""]
    lines += targets_markdown(result)
    return "\n".join(lines)


def targets(result: dict) -> dict:
    """The issue's targets as ratios of per-round medians (> 1: fundl faster)."""
    out = {}
    for m, rows in result["models"].items():
        def med(i):
            return rows.get(i, {}).get("ratio_to_fundl")  # impl / fundl

        def best(names):
            found = [(med(i), i) for i in names if med(i) is not None]
            return max(found) if found else None

        t = {}
        bp, bj, bt = best(PEERS), best(PEERS_JAX), best(("torch", "torch_1t"))
        if bp:
            t["fundl_vs_best_peer"] = (1 / bp[0], bp[1])
            if med("fundl_fused") is not None:
                t["fused_vs_best_peer"] = (med("fundl_fused") / bp[0], bp[1])
        if bj:
            t["fundl_vs_best_jax_peer"] = (1 / bj[0], bj[1])
        if bt:
            t["fundl_vs_best_torch"] = (1 / bt[0], bt[1])
            if med("fundl_fused") is not None:
                t["fused_vs_best_torch"] = (med("fundl_fused") / bt[0], bt[1])
        variants = [i for i in ("fundl_fused", "fundl_sharded", "fundl_sharded_fused") if med(i) is not None]
        if variants:
            top = max(variants, key=med)
            for name, ref in (("best_fundl_vs_best_peer", bp), ("best_fundl_vs_best_torch", bt)):
                if ref and med(top) > 1:
                    t[name] = (med(top) / ref[0], f"{top} vs {ref[1]}")
        if "stax" in rows and "steps_per_s" in rows["stax"] and "steps_per_s" in rows.get("fundl", {}):
            key = "first_step_s_cold" if "first_step_s_cold" in rows["fundl"] else "first_step_s"
            t["first_step_fundl_over_stax"] = (rows["fundl"].get(key) / rows["stax"].get(key, float("nan")), "stax")
        out[m] = t
    return out


def targets_markdown(result: dict) -> list[str]:
    keys = ["fundl_vs_best_peer", "fused_vs_best_peer", "fundl_vs_best_jax_peer", "fundl_vs_best_torch",
            "fused_vs_best_torch", "best_fundl_vs_best_peer", "first_step_fundl_over_stax"]
    rows = [[m] + [f"{t[k][0]:.2f} ({t[k][1]})" if k in t else "" for k in keys]
            for m, t in result.get("targets", {}).items()]
    return [harness.markdown_table(
        ["model", "fundl / best peer", "fused / best peer", "fundl / best JAX peer", "fundl / best torch",
         "fused / best torch", "best fundl variant / best peer", "first step fundl / stax"], rows)]


# ---------------------------------------------------------------------------
# The run


def parse_args(argv):
    p = harness.parser(__doc__, __spec__.name)
    p.add_argument("--models", default=",".join(ALL_MODELS))
    p.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help=f"from {','.join(ALL_IMPLS)}")
    harness.add_rounds(p, 5)
    p.add_argument("--slot", type=float, default=0.3, help="seconds per implementation per round")
    p.add_argument("--steps-per-call", type=int, default=10, help="K for fundl_fused")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: mlp and cnn1d only, 1 round, tiny slots, no memory probes")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="peak RSS and cold first step from a fresh process per implementation")
    p.add_argument("--unroll-study", action="store_true",
                   help="also time fundl fused with a rolled and a fully unrolled scan")
    harness.add_out(p)
    p.add_argument("--render", type=Path, default=None,
                   help="re-render the tables of an earlier benchmark.json (to --out) without running")
    p.add_argument("--nanogpt", default=os.environ.get("NANOGPT_DIR", ""),
                   help="a karpathy/nanoGPT checkout: then also run benchmarks/bench_nanogpt.py (default $NANOGPT_DIR)")
    p.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--end-to-end", action="store_true",
                   help="every shipped config through the real fit beside its bare step and a hand-written "
                        "loop (benchmarks/bench_end_to_end.py, which takes the flags that follow)")
    args = p.parse_args(argv)
    if args.quick:
        if args.models == ",".join(ALL_MODELS):
            args.models = "mlp,cnn1d"
        args.rounds, args.slot = 1, 0.05
    args.memory = (not args.quick) if args.memory is None else args.memory
    args.model_list, args.impl_list = harness.names(args.models), harness.names(args.impls)
    if args.unroll_study:
        args.impl_list += ["fundl_fused_rolled", "fundl_fused_unrolled"]
    for m in args.model_list:
        if m not in SPECS:
            p.error(f"unknown model {m!r}; choose from {ALL_MODELS}")
    for i in args.impl_list:
        if i not in ALL_IMPLS and i not in ("fundl_fused_rolled", "fundl_fused_unrolled"):
            p.error(f"unknown implementation {i!r}; choose from {ALL_IMPLS}")
    return args


def build_all(models, impls, steps_per_call, slot, skipped) -> tuple[dict, dict]:
    """Every implementation of every model built, compiled and warmed up, with its calls per slot
    calibrated: ``({(model, impl): Runner}, {model: {impl: row}})``."""
    runners, results = {}, {}
    for m in models:
        spec = SPECS[m]
        results[m] = {}
        flops = model_flops(spec)
        for i in impls:
            if skipped[i]:
                results[m][i] = {"skipped": "not importable"}
                continue
            t0 = time.perf_counter()
            r = build(i, spec, m, steps_per_call)
            if r is None:
                why = "one CPU device" if i.startswith("fundl_sharded") else (
                    "no recurrent layers" if spec["kind"] == "rnn" else "unsupported")
                results[m][i] = {"skipped": why}
                continue
            r.run(1)
            first = time.perf_counter() - t0
            r.run(2)  # warm-up
            t = time.perf_counter()  # calls per slot, calibrated on a short run
            r.run(3)
            per_call = (time.perf_counter() - t) / 3
            r.calls = max(1, round(slot / max(per_call, 1e-6)))
            runners[(m, i)] = r
            results[m][i] = {"first_step_s": first, "flops_per_step": flops,
                             "xla_memory_bytes": r.xla_memory_bytes(), "steps_per_call": r.steps_per_call,
                             "calls_per_slot": r.calls}
            print(f"built {m}/{i}: first step {first:.2f} s", file=sys.stderr)
    return runners, results


def steps_per_second(runner) -> float:
    """One slot of ``runner``: its calibrated calls, timed; optimiser steps per second."""
    t = time.perf_counter()
    runner.run(runner.calls)
    return runner.calls * runner.steps_per_call / (time.perf_counter() - t)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--end-to-end" in argv:  # its own flags (benchmarks/bench_end_to_end.py)
        from benchmarks import bench_end_to_end

        return bench_end_to_end.main([a for a in argv if a != "--end-to-end"])
    args = parse_args(argv)

    if args.render:
        result = json.loads(args.render.read_text())
        result.setdefault("date", "")
        result.setdefault("command", "")
        result.setdefault("load_start", result["machine"].get("load_start", ""))
        result.setdefault("load_end", result["machine"].get("load_end", ""))
        result["targets"] = targets(result)
        md = markdown(result)
        print(md)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "benchmark.md").write_text(md + "\n")
        return 0

    if any(i.startswith("fundl_sharded") for i in args.impl_list) or args._probe:
        # The cores as XLA:CPU devices for the sharded rows; other rows use device 0 as usual.
        import jax
        jax.config.update("jax_num_cpu_devices", harness.cpu_count())

    if args._probe:
        model_name, impl = args._probe.split(":")
        print(json.dumps(probe(model_name, impl, args.steps_per_call)))
        return 0

    import jax.numpy as jnp

    started = harness.start()
    (jnp.ones(3) + 1).block_until_ready()
    skipped = {i: available(i) for i in args.impl_list}
    for i, why in skipped.items():
        if why:
            print(f"skipping {i}: {why}", file=sys.stderr)
    if "torch" in args.impl_list and not skipped["torch"]:
        import torch
        torch.set_num_threads(harness.cpu_count())
        torch.ones(2) + 1
    peak = matmul_peak_gflops(1024 if args.quick else 2048)

    runners, results = build_all(args.model_list, args.impl_list, args.steps_per_call, args.slot, skipped)
    rates = harness.interleaved({k: (lambda r=r: steps_per_second(r)) for k, r in runners.items()}, args.rounds)
    for (m, i), rs in rates.items():
        row = results[m][i]
        r = harness.spread(rs)
        row.update(steps_per_s=r["median"], min=r["min"], max=r["max"], rounds=rs)
        if row["flops_per_step"]:
            row["gflops"] = row["steps_per_s"] * row["flops_per_step"] / 1e9
            row["pct_peak"] = 100 * row["gflops"] / peak
    for m in args.model_list:
        base = results[m].get("fundl", {}).get("rounds")
        for row in results[m].values():
            if "rounds" in row:
                row["ratio_to_fundl"] = harness.median_ratio(row["rounds"], base) if base else float("nan")
    del runners

    if args.memory:
        for m in args.model_list:
            for i, row in results[m].items():
                if "rounds" not in row:
                    continue
                pr = run_probe_subprocess(m, i, args.steps_per_call)
                if pr:
                    row.update(pr)
                    print(f"probed {m}/{i}: {pr}", file=sys.stderr)

    result = harness.finish(started, __spec__.name, argv)
    result["machine"]["matmul_peak_gflops"] = peak
    result.update(batch=BATCH, rounds=args.rounds, slot_s=args.slot, steps_per_call=args.steps_per_call,
                  fused_unroll={m: FUSED_UNROLL[m] for m in args.model_list}, models=results)
    result["targets"] = targets(result)
    md = markdown(result)
    print(md)
    harness.write_result(args.out, "benchmark", result, md)
    return nanogpt_side_by_side(args)


def nanogpt_side_by_side(args) -> int:
    """nanoGPT's baby recipe in fundl and in nanoGPT's model.py (benchmarks/bench_nanogpt.py), in a fresh
    process, when a nanoGPT checkout is named (``--nanogpt DIR`` or ``NANOGPT_DIR``); else a note."""
    if not args.nanogpt:
        print("benchmark: skipping the nanoGPT side by side (no nanoGPT checkout: set NANOGPT_DIR or --nanogpt DIR)",
              file=sys.stderr)
        return 0
    extra = ["--quick"] if args.quick else []
    extra += ["--out", args.out] if args.out else []
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_nanogpt", "--nanogpt", args.nanogpt, *extra],
                          cwd=harness.REPO_ROOT, text=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
