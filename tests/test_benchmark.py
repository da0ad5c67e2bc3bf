"""Smoke test of scripts/benchmark.py: one tiny round writes valid JSON and markdown.

Speed figures are not asserted (timings here are noisy); only that the
script runs end to end and reports every implementation it was asked for.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_quick_writes_json_and_markdown(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quick", "--models", "mlp,lstm1d",
           "--impls", "fundl,fundl_fused,stax", "--steps-per-call", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
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
