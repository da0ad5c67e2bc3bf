"""Smoke tests of the benchmarks (benchmarks/): a tiny run of each writes its tables.

Speed figures are not asserted (timings here are noisy); only that each
benchmark runs end to end and reports every variant it was asked for.  Each runs
as its users run it, ``python -m benchmarks.NAME`` from the repository root, in
a fresh process (benchmarks set JAX options, such as the CPU device count, that
must not leak into the test process).
"""

import json
import subprocess
import sys

import pytest
from conftest import ROOT



def _run(module, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def _run_ok(module, *args) -> str:
    proc = _run(module, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_benchmark_quick_writes_json_and_markdown(tmp_path):
    proc = _run("benchmark", "--quick", "--models", "mlp,lstm1d", "--impls", "fundl,fundl_fused,stax",
                "--steps-per-call", "2", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert set(result["models"]) == {"mlp", "lstm1d"}
    mlp = result["models"]["mlp"]
    for impl in ("fundl", "fundl_fused", "stax"):
        row = mlp[impl]
        assert row["steps_per_s"] > 0 and row["first_step_s"] > 0
        assert row["flops_per_step"] > 0 and row["gflops"] > 0
    assert mlp["fundl"]["ratio_to_fundl"] == 1.0
    assert mlp["fundl_fused"]["steps_per_call"] == 2
    assert result["models"]["lstm1d"]["stax"] == {"skipped": "no recurrent layers"}
    assert result["machine"]["matmul_peak_gflops"] > 0 and result["versions"]["jax"]
    md = (tmp_path / "benchmark.md").read_text()
    assert "| mlp | fundl |" in md and "| lstm1d | stax | n/a" in md
    assert result["command"].startswith("python -m benchmarks.benchmark --quick")


@pytest.mark.slow
def test_end_to_end_and_ab_runs_write_their_tables(tmp_path):
    """benchmarks/bench_end_to_end.py: the fit/bare/hand table, and --ab's one-key comparison through fit."""
    common = ["--configs", "tiny_synthetic", "--steps", "24", "--seconds", "1"]
    proc = _run("bench_end_to_end", *common, "--rounds", "1", "--out", tmp_path / "e2e")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "e2e" / "end_to_end.json").read_text())["configs"]["tiny_synthetic"]
    assert row["fit_examples_per_s"] > 0 and row["bare_examples_per_s"] > 0 and row["hand_examples_per_s"] > 0
    assert row["steps_per_call"] == 10  # "auto" for a dense model

    proc = _run("bench_end_to_end", *common, "--rounds", "2", "--ab", "data.prefetch=2,0", "--out", tmp_path / "ab")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "ab" / "end_to_end_ab.json").read_text())
    assert result["key"] == "data.prefetch" and result["values"] == ["2", "0"]
    row = result["configs"]["tiny_synthetic"]
    assert len(row["2"]) == len(row["0"]) == 2 and row["ratio_to_first"]["2"] == 1.0
    assert row["examples_per_s"]["0"] > 0
    assert "| tiny_synthetic |" in (tmp_path / "ab" / "end_to_end_ab.md").read_text()

    proc = _run("bench_end_to_end", *common, "--ab", "data.prefetchh=2,0")
    assert proc.returncode != 0 and "prefetchh" in proc.stderr  # a bad key is named, not ignored


@pytest.mark.slow
def test_profile_fit_times_every_part_of_the_loop():
    out = _run_ok("profile_fit", "--config", ROOT / "configs" / "tiny_synthetic.toml", "--steps", "24",
                  "--set", "logging.plots=false")
    assert "tiny_synthetic:" in out and "us per step over the" in out
    rows = {line.split("  ")[0]: line.split()[-4:] for line in out.splitlines()[2:-1]}
    assert set(rows) >= {"next batch", "log (waits for the device)", "evaluation", "checkpoint"}
    assert any(name.startswith("step call") for name in rows)
    assert int(rows["evaluation"][0]) == 2  # tiny_synthetic evaluates at steps 12 and 24
    assert all(float(v[1]) >= 0 for v in rows.values())


@pytest.mark.slow
def test_device_data_ab_reports_its_ratio():
    """Device-resident data against NumPy batches (``bench_end_to_end --device-data``; once a probe of its own)."""
    out = _run_ok("bench_end_to_end", "--device-data", "--configs", "tiny_synthetic", "--steps", "20", "--rounds", "2")
    assert out.startswith("tiny_synthetic: host ") and float(out.split("host time / device time")[1]) > 0


@pytest.mark.slow
def test_mlp_step_variants_report_their_ratios(tmp_path):
    """The parts of fundl's MLP step beside stax's (``benchmark``'s fundl_loss_only and fundl_tuple rows;
    once a probe of its own)."""
    _run_ok("benchmark", "--quick", "--models", "mlp1d", "--impls", "stax,fundl,fundl_loss_only,fundl_tuple",
            "--out", tmp_path)
    rows = json.loads((tmp_path / "benchmark.json").read_text())["models"]["mlp1d"]
    ratios = {impl: row["ratio_to_fundl"] for impl, row in rows.items()}
    assert set(ratios) == {"stax", "fundl", "fundl_loss_only", "fundl_tuple"} and ratios["fundl"] == 1.0
    assert all(r > 0 for r in ratios.values())


@pytest.mark.slow
def test_conv_chunk_table_reports_speedups_and_the_rules_pick():
    out = _run_ok("bench_conv_chunks", "--only", "7x7", "--rounds", "1", "--slot", "0.01", "--chunk-sizes", "64,8")
    row = [line for line in out.splitlines() if line.startswith("| 2d 7x7x64")]
    assert len(row) == 1, out
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[0] == "2d 7x7x64 -> 64, k3 (128)" and cells[-1] == "chunks of 8"
    assert float(cells[2]) > 0 and float(cells[3]) > 0 and float(cells[4]) > 0  # whole ms, 64, 8
    proc = _run("bench_conv_chunks", "--only", "nothing", timeout=120)
    assert proc.returncode == 2 and "matches none of" in proc.stderr


@pytest.mark.slow
def test_conv_compile_table_counts_the_convolutions_of_each_lowering(tmp_path):
    """The benchmark CNN (two chunked 2D layers, the first with no input gradient) in 2 chunks:
    weight gradient only, 2 forward + 1 input gradient + 2 x 2 weight gradients; everything,
    2 x 2 forward + 2 x 2 weight gradients + 2 input gradients."""
    out = _run_ok("bench_conv_compile", "--rounds", "1", "--step-rounds", "0", "--variants", "weight:2,all:2",
                  "--out", tmp_path)
    result = json.loads((tmp_path / "conv_compile.json").read_text())
    assert result["convolutions"] == {"weight:2": 2 + 1 + 4, "all:2": 4 + 4 + 2}, out
    assert set(result["compile_seconds"]) == {"weight:2", "all:2"}
    assert all(s[0] > 0 for s in result["compile_seconds"].values())
    proc = _run("bench_conv_compile", "--variants", "weight,some:3", timeout=120)
    assert proc.returncode != 0 and "unknown variant 'some:3'" in proc.stderr


@pytest.mark.slow
def test_random_compile_table_times_both_forms_of_each_draw(tmp_path):
    out = _run_ok("bench_random_compile", "--rounds", "1", "--only", "bernoulli rank 3", "--out", tmp_path)
    assert "| bernoulli rank 3 |" in out
    record = json.loads((tmp_path / "random_compile.json").read_text())
    cell = record["programs"]["bernoulli rank 3"]
    assert len(cell["shaped_s"]) == len(cell["flat_s"]) == 1 and cell["shaped_over_flat"] > 0


def test_random_compile_shaped_form_draws_as_jax_random_does():
    """The benchmark's premise: its "shaped" form is JAX's draw (no reshape), "flat" is fundl's."""
    import jax

    from benchmarks.bench_random_compile import form
    from fundl.nn import flat_random

    def reshapes(which):
        with form(which):
            jaxpr = jax.make_jaxpr(lambda k: flat_random.bernoulli(k, 0.5, (2, 3, 4)))(jax.random.key(0))
        return sum(e.primitive.name == "reshape" for e in jaxpr.eqns)

    assert reshapes("flat") == 1 and reshapes("shaped") == 0



@pytest.mark.slow
def test_suite_profile_charges_each_compile_to_its_test_and_to_the_process_it_started(tmp_path):
    """A two-test suite: one compiles in pytest's process, one starts a process that compiles."""
    (tmp_path / "test_tiny.py").write_text(
        "import os, subprocess, sys\n"
        "import jax, jax.numpy as jnp\n\n"
        "def double(x):\n    return 2 * x\n\n"
        "def test_here():\n    assert float(jax.jit(double)(jnp.ones(3)).sum()) == 6.0\n\n"
        "def test_in_a_process():\n"
        "    code = 'import jax, jax.numpy as jnp\\ndef halve(x):\\n    return x / 2\\nprint(jax.jit(halve)(jnp.ones(5)))'\n"
        "    env = {k: v for k, v in os.environ.items() if not k.startswith('FUNDL_')}  # as tests clean theirs\n"
        "    subprocess.run([sys.executable, '-c', code], check=True, env=env)\n")
    out = _run_ok("suite_profile", "--out", tmp_path / "out", "--", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                  "--rootdir", tmp_path, tmp_path / "test_tiny.py")
    assert "2 passed" in out, out
    record = json.loads((tmp_path / "out" / "suite_profile.json").read_text())
    assert record["run"]["returncode"] == 0 and record["run"]["cpu_s"] > 0
    pytest_side, started = record["kinds"]["pytest"], record["kinds"]["started by tests"]
    assert started["processes"] == 1 and started["compiles"] >= 1 and started["cpu_s"] > 0
    assert pytest_side["compiles"] >= 1
    compiles = {p["name"]: p["compiles"] for p in record["programs"]}
    assert compiles["jit(double)"] == compiles["jit(halve)"] == 1, compiles  # each counted once
    assert sum(b["compiles"] for b in record["bins"].values()) == pytest_side["compiles"] + started["compiles"]
    (tiny,) = [f for f in record["files"] if f["file"].endswith("test_tiny.py")]
    assert tiny["tests"] == 2 and tiny["compiles"] == pytest_side["compiles"] + started["compiles"] - sum(
        f["compiles"] for f in record["files"] if f is not tiny)
