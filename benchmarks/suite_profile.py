"""Where the test suite's time goes: JAX's compilation by test file, by program and by duration, in
every process of one pytest run (the xdist workers and every process the tests start).

    python -m benchmarks.suite_profile [--out DIR] [--top 25] [-- PYTEST_ARGS ...]

Runs ``python -m pytest`` (by default ``-q -n auto --dist loadgroup``, as ``make test``) with a
``sitecustomize`` module first on ``PYTHONPATH``, so every Python process of the run, however
deeply started, loads it (a ``sitecustomize`` of the environment's own is hidden for the run).
Once a process has imported JAX it listens to JAX's monitoring events: each backend compilation
(with its program's name and duration), lowering, tracing, and the persistent cache's hits and
misses, charged to the test running (``PYTEST_CURRENT_TEST``: in a process a test started, the test
that started it). Each process writes its record when it exits (one killed by a signal, as the fault
tests kill theirs, writes none); the xdist workers, which exit without running ``atexit``, write
theirs when pytest unconfigures them. A pytest plugin adds each test's wall and CPU time.

Reports: the run's wall time and the CPU of all its processes; JAX's compilation, lowering and
tracing in pytest's own processes and in those the tests started; compilations by duration; the
programs that took longest to compile, by name; the test files by CPU (theirs and their
processes'). The runs are in docs/benchmarks.md, "Test suite".
"""

from __future__ import annotations

import collections
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness

DEFAULT_PYTEST_ARGS = ["-q", "-n", "auto", "--dist", "loadgroup"]
COMPILE = "/jax/core/compile/backend_compile_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
TRACE = "/jax/core/compile/jaxpr_trace_duration"
HITS = "/jax/compilation_cache/cache_hits"
MISSES = "/jax/compilation_cache/cache_misses"
SECONDS = {COMPILE: "compile_s", LOWER: "lower_s", TRACE: "trace_s"}  # event -> the report's key
BINS = [(0.02, "< 20 ms"), (0.05, "20–50 ms"), (0.1, "50–100 ms"), (0.3, "0.1–0.3 s"), (1.0, "0.3–1 s"),
        (float("inf"), "≥ 1 s")]

# Loaded by every process of the run (it is first on PYTHONPATH); imports nothing heavy itself.
SITECUSTOMIZE = '''
import builtins, json, os, resource, sys, time

_DIR = {records!r}  # not an environment variable: tests start processes in cleaned environments
_STARTED_BY = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
_T0 = time.time()
RECORD = {"argv": sys.argv[:4], "started_by": _STARTED_BY, "durations": {}, "events": {}, "programs": {},
          "tests": {}}
_import = builtins.__import__


def _test():
    return _STARTED_BY or os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]


def _on_duration(event, seconds, **kwargs):
    sums = RECORD["durations"].setdefault(_test(), {})
    n, s = sums.get(event, (0, 0.0))
    sums[event] = (n + 1, s + seconds)
    if event.endswith("backend_compile_duration"):
        RECORD["programs"].setdefault(str(kwargs.get("fun_name")), []).append(round(seconds, 5))


def _on_event(event, **kwargs):
    counts = RECORD["events"].setdefault(_test(), {})
    counts[event] = counts.get(event, 0) + 1


def _listening_import(*args, **kwargs):
    module = _import(*args, **kwargs)
    monitoring = sys.modules.get("jax.monitoring")
    # once only: an import inside this one may have registered already
    if builtins.__import__ is _listening_import and hasattr(monitoring, "register_event_listener"):
        builtins.__import__ = _import
        monitoring.register_event_duration_secs_listener(_on_duration)
        monitoring.register_event_listener(_on_event)
    return module


builtins.__import__ = _listening_import


def write():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    RECORD.update(cpu=usage.ru_utime + usage.ru_stime, wall=time.time() - _T0)
    with open(os.path.join(_DIR, f"{os.getpid()}.json"), "w") as f:
        json.dump(RECORD, f)


import atexit
atexit.register(write)
'''

PLUGIN = '''
import time
import pytest
import sitecustomize


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    sitecustomize.RECORD["tests"][item.nodeid] = (time.perf_counter() - wall, time.process_time() - cpu)


def pytest_unconfigure(config):
    sitecustomize.write()
'''


def run_suite(pytest_args: list[str], records: Path) -> dict:
    """Run pytest with the listeners in place; its exit code, wall time, CPU and last line."""
    hooks = Path(tempfile.mkdtemp(prefix="fundl-suite-profile-"))
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE.replace("{records!r}", repr(str(records))))
    (hooks / "fundl_suite_profile_plugin.py").write_text(PLUGIN)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(p for p in [str(hooks), os.environ.get("PYTHONPATH", "")] if p)}
    env.pop("PYTEST_CURRENT_TEST", None)  # run from inside a test: the suite's processes are its own
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    try:
        proc = harness.run_module("pytest", ["-p", "fundl_suite_profile_plugin", *pytest_args], env=env)
    finally:
        shutil.rmtree(hooks, ignore_errors=True)
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {"returncode": proc.returncode, "wall_s": wall, "cpu_s": cpu, "summary": lines[-1] if lines else "",
            "not_passed": [line for line in lines if line.startswith(("FAILED", "ERROR"))],
            "stderr_tail": proc.stderr[-2000:]}


def _file(test: str) -> str:
    return test.split("::")[0] if test else "(outside any test)"


def summarise(records: list[dict], top: int) -> dict:
    """The report's numbers from every process's record."""
    kinds = {"pytest": collections.Counter(), "started by tests": collections.Counter()}
    files = collections.defaultdict(collections.Counter)
    programs = collections.defaultdict(lambda: [0, 0.0])
    bins = {label: [0, 0.0] for _, label in BINS}
    for r in records:
        kind = kinds["started by tests" if r["started_by"] else "pytest"]
        kind["processes"] += 1
        kind["cpu_s"] += r["cpu"]
        if r["started_by"]:
            files[_file(r["started_by"])]["cpu_s"] += r["cpu"]
        for test, sums in r["durations"].items():
            for event, (n, s) in sums.items():
                key = SECONDS.get(event)
                if key:
                    kind[key] += s
                    files[_file(test)][key] += s
                if event == COMPILE:
                    kind["compiles"] += n
                    files[_file(test)]["compiles"] += n
        for test, counts in r["events"].items():
            kind["cache_hits"] += counts.get(HITS, 0)
            kind["cache_misses"] += counts.get(MISSES, 0)
        for test, (wall, cpu) in r["tests"].items():
            files[_file(test)]["cpu_s"] += cpu
            files[_file(test)]["tests"] += 1
        for name, durations in r["programs"].items():
            programs[name][0] += len(durations)
            programs[name][1] += sum(durations)
            for d in durations:
                label = next(label for bound, label in BINS if d < bound)
                bins[label][0] += 1
                bins[label][1] += d
    rnd = lambda c: {k: round(v, 2) if isinstance(v, float) else v for k, v in c.items()}  # noqa: E731
    return {
        "kinds": {k: rnd(c) for k, c in kinds.items()},
        "bins": {label: {"compiles": n, "seconds": round(s, 2)} for label, (n, s) in bins.items()},
        "programs": [{"name": name, "compiles": n, "seconds": round(s, 2)}
                     for name, (n, s) in sorted(programs.items(), key=lambda kv: -kv[1][1])[:top]],
        "files": [{"file": f, **rnd(c)} for f, c in sorted(files.items(), key=lambda kv: -kv[1]["cpu_s"])[:top]],
    }


def markdown(run: dict, report: dict) -> str:
    kinds = harness.markdown_table(
        ["processes", "count", "CPU s", "compile s", "lowering s", "tracing s", "compiles", "cache hits", "misses"],
        [[k, c.get("processes", 0), f"{c.get('cpu_s', 0):.0f}", f"{c.get('compile_s', 0):.0f}",
          f"{c.get('lower_s', 0):.0f}", f"{c.get('trace_s', 0):.0f}", c.get("compiles", 0), c.get("cache_hits", 0),
          c.get("cache_misses", 0)] for k, c in report["kinds"].items()], "lrrrrrrrr")
    bins = harness.markdown_table(["compile time", "compiles", "seconds"],
                                  [[k, b["compiles"], f"{b['seconds']:.0f}"] for k, b in report["bins"].items()], "lrr")
    programs = harness.markdown_table(["program", "compiles", "seconds"],
                                      [[f"`{p['name']}`", p["compiles"], f"{p['seconds']:.1f}"]
                                       for p in report["programs"]], "lrr")
    files = harness.markdown_table(["test file", "tests", "CPU s (with its processes)", "compile s", "compiles"],
                                   [[f"`{f['file']}`", f.get("tests", 0), f"{f.get('cpu_s', 0):.1f}",
                                     f"{f.get('compile_s', 0):.1f}", f.get("compiles", 0)] for f in report["files"]],
                                   "lrrrr")
    outcome = "\n".join([f"pytest: {run['summary']} (exit {run['returncode']}); {run['wall_s']:.0f} s wall, "
                         f"{run['cpu_s']:.0f} s CPU in all its processes", *run["not_passed"]])
    return "\n\n".join([outcome, kinds, bins, programs, files])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, pytest_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = harness.parser(__doc__, "benchmarks.suite_profile")
    p.add_argument("--top", type=int, default=25, help="rows in the tables of programs and of test files")
    harness.add_out(p)
    args = p.parse_args(ours)
    started = harness.start()
    with tempfile.TemporaryDirectory(prefix="fundl-suite-records-") as records:
        run = run_suite(pytest_args or DEFAULT_PYTEST_ARGS, Path(records))
        loaded = [json.loads(f.read_text()) for f in sorted(Path(records).glob("*.json"))]
    report = summarise(loaded, args.top)
    record = {**harness.finish(started, "benchmarks.suite_profile", argv), "run": run, **report}
    text = harness.header(record) + "\n\n" + markdown(run, report)
    print(text)
    if run["returncode"] not in (0, 5):  # 5: no test collected
        print(run["stderr_tail"], file=sys.stderr)
    harness.write_result(args.out, "suite_profile", record, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
