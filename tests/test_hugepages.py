"""fundl/run/hugepages.py: the scripts and benchmarks re-execute themselves with glibc's malloc using huge pages.

Why (measured in docs/benchmarks.md, "Page faults"): XLA:CPU frees and re-allocates
each step's temporary buffer, and with 4 KiB pages every step faults it in again.
"""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fundl.run import hugepages as hp
from conftest import ROOT

GLIBC = ("glibc", "2.36")
# Every program that imports JAX and is started by hand: the scripts, the example, every benchmark
# (bench_ensemble and bench_first_step import no JAX: they time fresh processes -- scripts/train.py, which
# re-executes itself, and each library's first step, started alike for fundl and its peers).
ENTRY_SCRIPTS = ["scripts/train.py", "scripts/evaluate.py", "scripts/reproduce_mnist1d.py", "examples/meta_lr.py"] + [
    f"benchmarks/{name}.py" for name in ("benchmark", "bench_end_to_end", "bench_conv_chunks", "bench_page_faults",
                                         "bench_rnn_layouts", "bench_remat", "bench_loader", "bench_checkpoint",
                                         "bench_parallel", "profile_fit", "bench_nanogpt", "bench_generation",
                                         "bench_char_lms", "bench_gpt_step", "bench_conv_compile",
                                         "bench_random_compile")]
QUALIFIES = hp.tuned_environ(os.environ, system=sys.platform, libc=hp.libc_version(), thp=hp.thp_mode()) \
    is not None or "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", "")


def test_tuned_environ_adds_the_tunable_and_keeps_the_users_own():
    env = hp.tuned_environ({"PATH": "/bin"}, system="linux", libc=GLIBC, thp="madvise")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = hp.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, system="linux", libc=GLIBC,
                           thp="madvise")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ, system, libc, thp", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "linux", GLIBC, "madvise"),  # after the exec: no loop
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "linux", GLIBC, "madvise"),  # the user's choice stands
    ({"FUNDL_HUGEPAGES": "0"}, "linux", GLIBC, "madvise"),                      # turned off
    ({}, "linux", GLIBC, "always"),        # large mappings get huge pages already
    ({}, "linux", GLIBC, "never"),         # the kernel gives none
    ({}, "linux", GLIBC, None),            # no THP setting to read
    ({}, "linux", ("glibc", "2.31"), "madvise"),   # before glibc 2.35: no such tunable
    ({}, "linux", ("", ""), "madvise"),            # musl
    ({}, "darwin", ("", ""), "madvise"),
    ({}, "linux", ("glibc", "weird"), "madvise"),
])
def test_tuned_environ_is_none_where_reexecuting_changes_nothing(environ, system, libc, thp):
    assert hp.tuned_environ(environ, system=system, libc=libc, thp=thp) is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hp.thp_mode(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert hp.thp_mode(str(f)) == "always"
    assert hp.thp_mode(str(tmp_path / "missing")) is None


def _run_probe(tmp_path, extra_env, body):
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys
        if __name__ == "__main__":
            from fundl.run.hugepages import reexec_with_huge_pages
            reexec_with_huge_pages()
    """) + textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FUNDL_HUGEPAGES")}
    env.update(extra_env)
    p = subprocess.Popen([sys.executable, "-X", "utf8", str(script), "a b", "--flag"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return p.pid, json.loads(out.strip().splitlines()[-1])


PROBE = ('print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "utf8": sys.flags.utf8_mode, '
         '"tunables": os.environ.get("GLIBC_TUNABLES")}))')


@pytest.mark.skipif(not QUALIFIES, reason="this machine needs no re-exec (no glibc >= 2.35 or THP not madvise)")
def test_a_script_reexecutes_itself_in_place_with_the_tunable(tmp_path):
    pid, seen = _run_probe(tmp_path, {}, PROBE)
    # same process (exec keeps the pid), same arguments and interpreter flags, the tunable set
    assert seen == {"pid": pid, "argv": ["a b", "--flag"], "utf8": 1, "tunables": "glibc.malloc.hugetlb=1"}
    _, seen = _run_probe(tmp_path, {"FUNDL_HUGEPAGES": "0"}, PROBE)
    assert seen["tunables"] is None


def test_started_as_this_script_only_for_the_programs_own_script(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    assert hp.started_as_this_script(str(script), ["python", "-X", "utf8", str(script), "--flag"])
    assert not hp.started_as_this_script(str(script), ["python", "-m", "ipykernel_launcher", "-f", "k.json"])
    assert not hp.started_as_this_script(str(script), [])


def test_started_as_this_script_for_a_module_run_with_dash_m(tmp_path):
    """``python -m benchmarks.benchmark``: sys.argv[0] is the module's file, the command line names the module."""
    module = tmp_path / "benchmarks" / "benchmark.py"
    package_main = tmp_path / "tools" / "__main__.py"
    for f in (module, package_main):
        f.parent.mkdir()
        f.write_text("")
    assert hp.started_as_this_script(str(module), ["python", "-m", "benchmarks.benchmark", "--quick"])
    assert hp.started_as_this_script(str(module), ["python", "-X", "utf8", "-m", "benchmarks.benchmark"])
    assert hp.started_as_this_script(str(module), ["python", "-mbenchmarks.benchmark"])
    assert hp.started_as_this_script(str(package_main), ["python", "-m", "tools", "a"])
    assert not hp.started_as_this_script(str(module), ["python", "-m", "benchmarks.other"])
    assert not hp.started_as_this_script(str(module), ["python", "-m", "tools.benchmark"])
    assert not hp.started_as_this_script(str(module), ["python", "-m", "ipykernel_launcher", "-f", "k.json"])
    assert not hp.started_as_this_script(str(module), ["python", "other.py", "-m", "benchmarks.benchmark"])
    assert not hp.started_as_this_script(str(module), ["python", "-c", "pass", "-m", "benchmarks.benchmark"])
    assert not hp.started_as_this_script(str(module), ["python", "-m"])


@pytest.mark.skipif(not QUALIFIES, reason="this machine needs no re-exec (no glibc >= 2.35 or THP not madvise)")
def test_a_script_run_inside_another_program_does_not_replace_it(tmp_path):
    """IPython's %run executes a script as __main__ inside the kernel: exec would replace the kernel."""
    _run_probe(tmp_path, {}, PROBE)  # writes probe.py, which re-executes when started itself
    host = tmp_path / "host.py"
    host.write_text(textwrap.dedent(f"""
        import json, os, runpy, sys
        sys.argv = [{str(tmp_path / "probe.py")!r}]
        runpy.run_path(sys.argv[0], run_name="__main__")
        print(json.dumps({{"still_here": True, "tunables": os.environ.get("GLIBC_TUNABLES")}}))
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FUNDL_HUGEPAGES")}
    out = subprocess.run([sys.executable, str(host)], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"still_here": True, "tunables": None}


FAULTS = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(6):   # like XLA's per-step temporary buffer: malloc'd, written, freed (numpy would madvise itself)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = libc.malloc(64 * 2**20)
    ctypes.memset(a, 1, 64 * 2**20)
    libc.free(a)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"faults": sorted(faults[1:])[2]}))
"""


@pytest.mark.skipif(not QUALIFIES, reason="this machine needs no re-exec (no glibc >= 2.35 or THP not madvise)")
def test_the_tunable_removes_most_page_faults_of_a_buffer_reallocated_every_step(tmp_path):
    _, without = _run_probe(tmp_path, {"FUNDL_HUGEPAGES": "0"}, FAULTS)
    _, with_ = _run_probe(tmp_path, {}, FAULTS)
    assert without["faults"] >= 8000            # 64 MiB in 4 KiB pages: 16,384 faults
    assert with_["faults"] < without["faults"] / 4, (with_, without)


@pytest.mark.parametrize("name", ENTRY_SCRIPTS)
def test_entry_scripts_reexecute_before_importing_jax_or_fundl(name):
    """glibc reads the tunable only at process start, and importing JAX first would waste its import time."""
    tree = ast.parse((ROOT / name).read_text())
    heavy = ("jax", "fundl", "numpy", "torch")
    reexec_at = heavy_at = None
    for node in tree.body:
        if isinstance(node, ast.If) and "reexec_with_huge_pages" in ast.unparse(node) and reexec_at is None:
            assert ast.unparse(node.test) == "__name__ == '__main__'"
            reexec_at = node.lineno
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if heavy_at is None and any(n.split(".")[0] in heavy for n in names):
            heavy_at = node.lineno
    assert reexec_at is not None, f"{name} does not call reexec_with_huge_pages"
    assert heavy_at is None or reexec_at < heavy_at, (name, reexec_at, heavy_at)


def test_every_benchmark_module_is_on_the_entry_script_list():
    listed = {Path(name).stem for name in ENTRY_SCRIPTS if name.startswith("benchmarks/")}
    # suite_profile runs JAX only in the pytest it starts, as `make test` does: without the tunable
    modules = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__", "harness", "peers", "bench_ensemble",
                                                                 "bench_first_step", "suite_profile"}
    assert modules == listed


def _bench_page_faults(*args):
    """``python -m benchmarks.bench_page_faults ARGS`` from the repository root, as docs/benchmarks.md runs it."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FUNDL_HUGEPAGES")}
    return subprocess.run([sys.executable, "-m", "benchmarks.bench_page_faults", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_bench_page_faults_compares_both_settings_in_alternating_processes():
    proc = _bench_page_faults("--models", "mlp", "--pairs", "1", "--steps", "3", "--seconds", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    seen = out.splitlines()[0]
    if QUALIFIES:  # the 4 KiB process runs without the tunable, the default one with it
        assert seen.startswith("GLIBC_TUNABLES seen: '' / 'glibc.malloc.hugetlb=1'"), seen
    row = next(line for line in out.splitlines() if line.startswith("| mlp |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 7 and float(cells[4]) > 0 and float(cells[5]) > 0, row
    proc = _bench_page_faults("--models", "nope")
    assert proc.returncode == 2 and "unknown ['nope']" in proc.stderr
