"""benchmarks/bench_rnn_layouts.py --forward --hlo: the command behind docs/benchmarks.md's LSTM layout table."""

import subprocess
import sys

import pytest
from conftest import ROOT



@pytest.mark.slow
def test_forward_timing_and_hlo_counts_run_for_each_layout():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_rnn_layouts", "--cells", "lstm", "--layouts",
         "fused,hoisted", "--unrolls", "1", "--no-fundl", "--forward", "--hlo", "--steps", "4", "--batch", "8",
         "--hidden", "8", "--features", "3", "--repeats", "1", "--iters", "1"],
        capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.count("loop fusions split into parallel tasks") == 2, out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| lstm |")]
    assert [r[1] for r in rows] == ["fused", "hoisted"] and all(float(r[3]) > 0 for r in rows), out
    assert "calls/s" in out
