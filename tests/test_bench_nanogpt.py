"""benchmarks/bench_nanogpt.py's quick mode: nanoGPT's recipe in fundl and in nanoGPT's model.py runs end to
end and reports both sides.  nanoGPT is not fundl's to ship: the test runs only where a checkout is named by
``NANOGPT_DIR`` (it is skipped elsewhere).  Figures are not asserted: docs/benchmarks.md records them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

NANOGPT = os.environ.get("NANOGPT_DIR", "")


@pytest.mark.slow  # two frameworks' models built and trained for 20 steps: seconds
@pytest.mark.skipif(not (NANOGPT and (Path(NANOGPT) / "model.py").is_file()),
                    reason="no nanoGPT checkout: set NANOGPT_DIR to a karpathy/nanoGPT checkout")
def test_quick_side_by_side_reports_both_sides(tmp_path):
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_nanogpt", "--nanogpt", NANOGPT, "--quick",
                           "--set", "model.layers=1", "--set", "model.width=32", "--torch-threads", "1", "--out", tmp_path],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "nanogpt.json").read_text())
    assert result["steps"] == 20 and result["eval_steps"] == [20]
    for side in ("fundl", "nanogpt"):
        r = result["sides"][side]
        assert len(r["chunk_seconds"]) == 1 and r["chunk_seconds"][0] > 0
        assert 1.0 < r["val_loss"][-1] < 5.0  # a 65-character vocabulary starts near ln 65 = 4.17
    assert set(result["targets"]) >= {"val_loss_gap", "torch_over_fundl_time"}
    assert "| fundl |" in (tmp_path / "nanogpt.md").read_text()
