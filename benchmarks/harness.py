"""What every benchmark shares: interleaved rounds, medians and ratios, tables, the run's record.

The method, the same in every benchmark: build and warm up every variant first; then time them
in rounds, each variant once per round, the order rotated from round to round (``interleaved``),
so that drift in the machine's load hits every variant alike.  A figure is the median over rounds;
a ratio is the median of the per-round ratios (``median_ratio``), not the ratio of two medians.

A run's record (``start``, then ``finish``) holds what a figure needs beside it in
docs/benchmarks.md: the date, the machine, the load average before and after, the library
versions and the command that regenerates it (``python -m benchmarks.NAME ARGS``).

This module imports no JAX at the top: a benchmark imports it before ``reexec_with_huge_pages``
may re-execute the process (fundl/run/hugepages.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = REPO_ROOT / "configs"
DISTRIBUTIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "equinox", "dm-haiku", "torch", "numpy",
                 "ml_dtypes")


# ---------------------------------------------------------------------------
# The machine


def cpu_count() -> int:
    """Cores this process may run on (its CPU affinity where the OS says, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name (``lscpu``), else what ``platform`` says."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``"1.23 1.10 0.98"``."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def versions(distributions: Iterable[str] = DISTRIBUTIONS) -> dict:
    """Python's version and each installed distribution's (the missing ones left out)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in distributions:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine() -> dict:
    """The CPU, its cores, the platform and the environment variables that change XLA's or malloc's speed."""
    return {"cpu": cpu_model(), "cores": cpu_count(), "platform": platform.platform(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


# ---------------------------------------------------------------------------
# A run's record


def command(module: str, argv: Sequence[str] | None = None) -> str:
    """The command line that regenerates a run: ``python -m MODULE ARGS`` (``argv``: the process's own)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", module, *args])


def run_module(module: str, args: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` in a fresh process started in the repository root (so that it
    imports ``benchmarks`` and fundl as this process does), its output captured as text."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, **kwargs)


def start() -> dict:
    """Taken before measuring: the date, the load average and a clock."""
    return {"date": utc_now(), "load_start": load_average(), "clock": time.perf_counter()}


def finish(started: dict, module: str, argv: Sequence[str] | None = None) -> dict:
    """The run's record: ``started``'s date and load, the load now, the wall time, the command,
    the machine and the versions.  A benchmark adds its figures to this dict and writes it."""
    return {"date": started["date"], "load_start": started["load_start"], "load_end": load_average(),
            "wall_s": time.perf_counter() - started["clock"], "command": command(module, argv),
            "machine": machine(), "versions": versions()}


def header(record: dict) -> str:
    """One line for above a table: date, machine, load before and after, jax, tunables, the command."""
    m, v = record["machine"], record["versions"]
    env = "; ".join(f"{name}={m[key]!r}" for name, key in (("GLIBC_TUNABLES", "glibc_tunables"),
                                                          ("XLA_FLAGS", "xla_flags")) if m.get(key))
    return (f"{record['date']}, {m['cpu']}, {m['cores']} cores, load {record['load_start']} -> "
            f"{record['load_end']}; jax {v.get('jax', '?')}" + (f"; {env}" if env else "") +
            f"; `{record['command']}`")


def write_result(out: Path | None, stem: str, record: dict, markdown: str) -> None:
    """``OUT/STEM.json`` (the record) and ``OUT/STEM.md`` (the table), when ``out`` is given."""
    if out is None:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1, default=str))
    (out / f"{stem}.md").write_text(markdown + "\n")


# ---------------------------------------------------------------------------
# Measuring


def rotated(items: Sequence, index: int) -> list:
    """``items`` starting at position ``index`` (modulo their number): round ``index``'s order."""
    items = list(items)
    if not items:
        return items
    k = index % len(items)
    return items[k:] + items[:k]


def interleaved(measures: dict[str, Callable[[], float]], rounds: int,
                on_round: Callable[[int, dict], None] | None = None) -> dict[str, list[float]]:
    """Each measure once per round, ``rounds`` times, the order rotated every round.

    A measure returns one figure (seconds, or a rate); the result holds each measure's figures
    in round order, so that ``median_ratio`` can pair them.  ``on_round(round, figures)`` is
    called after each round (for progress lines on stderr).
    """
    figures = {name: [] for name in measures}
    for r in range(rounds):
        for name in rotated(list(measures), r):
            figures[name].append(measures[name]())
        if on_round is not None:
            on_round(r, figures)
    return figures


def config_step(config: dict, compiling=None) -> tuple[Callable[[], object], int]:
    """``(call, steps_per_epoch)``: one jitted training step of ``config`` (built as
    ``scripts/train.py`` builds it) on its first batch, the state carried from call to call;
    compiled here, inside the context manager ``compiling`` if one is given."""
    import contextlib

    import jax

    from fundl.data import Loader
    from fundl.run.build import initial_state, load_data, train_step_for

    data = load_data(config)
    loader = Loader(data.train, config["training"]["batch_size"], seed=0, drop_last=True, prefetch=0)
    model, optimizer, state = initial_state(config, data, loader.steps_per_epoch)
    step = jax.jit(train_step_for(config, model, optimizer), donate_argnums=0)
    batch = jax.device_put(loader.batch(0, 0))
    box = [state]

    def call():
        box[0], metrics = step(box[0], batch)
        return metrics

    with compiling if compiling is not None else contextlib.nullcontext():
        jax.block_until_ready(call())  # trace and compile
    return call, loader.steps_per_epoch


def seconds_per_call(fn: Callable[[], object], seconds: float, wait: Callable[[object], object]) -> float:
    """Call ``fn`` again and again for about ``seconds`` (at least once), then ``wait`` for its last
    result (``jax.block_until_ready``): the mean seconds per call."""
    start_, n = time.perf_counter(), 0
    while True:
        out = fn()
        n += 1
        if time.perf_counter() - start_ >= seconds:
            break
    wait(out)
    return (time.perf_counter() - start_) / n


def calls_per_round(calls: dict, rounds: int, seconds: float, progress: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls`` (name -> a no-argument function returning JAX arrays),
    ``seconds`` of calls per name per round (``seconds_per_call``, the last result waited for with
    ``jax.block_until_ready``), in ``rounds`` interleaved rounds; ``progress``: a line per round on
    stderr, each name's latest ms per call."""
    import jax

    def report(r, figures):
        print(f"round {r}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in figures.items()), file=sys.stderr)

    measures = {name: (lambda c=c: seconds_per_call(c, seconds, jax.block_until_ready)) for name, c in calls.items()}
    return interleaved(measures, rounds, report if progress else None)


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median over rounds of ``a[i] / b[i]``: drift within a round hits both sides alike."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def spread(values: Sequence[float]) -> dict:
    """``{"median", "min", "max"}`` of a measure's figures over rounds."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# ---------------------------------------------------------------------------
# Tables and flags


def markdown_table(head: Sequence[str], rows: Iterable[Sequence], align: str = "") -> str:
    """A Markdown table; ``align`` has one letter per column, ``l`` (the default) or ``r``."""
    align = align.ljust(len(head), "l")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def parser(doc: str, module: str) -> argparse.ArgumentParser:
    """An argument parser for ``python -m MODULE`` whose ``--help`` shows the module's docstring as written."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_rounds(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument("--rounds", type=int, default=default, help="interleaved rounds (the median is reported)")


def add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON and Markdown here")


def names(value: str) -> list[str]:
    """``"a,b,,c"`` -> ``["a", "b", "c"]``: a comma-separated flag's items."""
    return [v for v in value.split(",") if v]
