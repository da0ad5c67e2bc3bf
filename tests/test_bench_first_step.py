"""benchmarks/bench_first_step.py runs end to end: cold and warm first steps (fresh processes on an
empty, then filled, compilation cache) beside a peer, and a train config run twice in a fresh
home.  No timing is asserted (see tests/test_benchmark.py); only what the report holds."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_first_step_cold_and_warm_and_two_train_runs_are_reported(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_first_step", "--models", "mlp", "--impls",
                           "fundl,stax", "--rounds", "1", "--train-rounds", "1", "--config",
                           "configs/tiny_synthetic.toml", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "first_step.json").read_text())
    mlp = result["first_step"]["mlp"]
    for impl in ("fundl", "stax"):
        assert mlp["impls"][impl]["cold_s"] > 0 and mlp["impls"][impl]["warm_s"] > 0
    assert mlp["fastest_peer"] == "stax" and mlp["fundl_cold_over_fastest_peer"] > 0
    assert result["train"]["first"][0] > 0 and result["train"]["second"][0] > 0
    assert "| mlp | fundl |" in (tmp_path / "first_step.md").read_text()
