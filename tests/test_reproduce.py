"""scripts/reproduce_mnist1d.py (fundl.run.reproduce_mnist1d) with tiny settings: the report's rows,
paper column and statistics."""

import json
import math

import pytest

from fundl.run import reproduce_mnist1d
from conftest import ROOT

# One xdist worker runs this file, so its module-scoped fixtures run once under `make test` (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_reproduce")

PAPER = {"logistic": 32, "gru": 91, "fundl_cnn": 94}  # a paper model, a recurrent one, one of fundl's own
REFERENCE = ("logistic", "gru")
PAPER_LOGS = ("logistic", "gru")  # the paper's models among them


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Three models, 2 seeds, 20 steps; the paper's code beside two of them when torch is installed."""
    tmp = tmp_path_factory.mktemp("reproduce")
    argv = ["--seeds", "2", "--steps", "20", "--models", ",".join(PAPER), "--out-dir", str(tmp / "docs"),
            "--runs-dir", str(tmp / "runs")]
    try:
        import torch  # noqa: F401
        argv.append("--torch-reference=" + ",".join(REFERENCE))
    except ImportError:
        pass
    assert reproduce_mnist1d.main(argv) == 0
    return (json.loads((tmp / "docs" / "reproduction.json").read_text()),
            (tmp / "docs" / "reproduction.md").read_text(), tmp, argv)


@pytest.mark.slow
def test_json_holds_per_seed_numbers_and_their_mean_and_std(report):
    data, _, tmp, _ = report
    assert [m["name"] for m in data["models"]] == list(PAPER)
    for m in data["models"]:
        acc = m["test_accuracy"]
        assert m["seeds"] == [0, 1] and len(acc) == 2 and all(0 <= a <= 1 for a in acc)
        mean = sum(acc) / 2
        assert m["mean"] == pytest.approx(mean) and m["std"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in acc)))
        assert round(100 * m["paper_accuracy"]) == PAPER[m["name"]] and m["steps"] == 20
        assert m["below_paper"] == (m["mean"] < m["paper_accuracy"] - m["std"])
        assert m["wall_seconds"] > 0 and m["num_params"] > 0
        summary = json.loads((tmp / "runs" / m["name"] / "summary.json").read_text())
        assert [s["test_accuracy"] for s in summary["members"]] == acc  # one ensemble run per model
    assert {"cpu", "cores", "jax"} <= set(data["machine"]) and data["steps"] == 20 and data["seeds"] == 2


@pytest.mark.slow
def test_markdown_has_a_row_per_model_with_the_paper_column_and_the_command(report):
    data, md, _, argv = report
    assert "python scripts/reproduce_mnist1d.py " + " ".join(argv) in md
    assert data["machine"]["cpu"] in md and f"jax {data['machine']['jax']}" in md and "Shortened run" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "`configs/" in line]
    assert len(rows) == len(PAPER)
    for line, m in zip(rows, data["models"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == m["label"] and cells[1] == f"`{m['config']}`"
        assert cells[4].split()[0] == str(PAPER[m["name"]])
        assert (cells[5] != "") == (m["name"] in PAPER_LOGS)  # the paper's notebooks' own step-6000 figures
        assert cells[6].startswith(f"**{100 * m['mean']:.1f} ± {100 * m['std']:.1f}**")
        assert cells[7] == ", ".join(f"{100 * a:.1f}" for a in m["test_accuracy"])
        assert ("torch_reference" in m) == (m["name"] in REFERENCE and "--torch-reference" in " ".join(argv))
        if "torch_reference" in m:
            t = m["torch_reference"]
            assert cells[10] == f"{100 * t['mean']:.1f} ± {100 * t['std']:.1f}" and len(t["test_accuracy"]) == 2
    below = [m["label"] for m in data["models"] if m["below_paper"]]
    assert all(f"**{label}**" in md.split("## Below the paper")[1] for label in below)


def test_bad_arguments_say_what_was_expected(capsys):
    with pytest.raises(SystemExit):
        reproduce_mnist1d.main(["--models", "cnn,resnet"])
    assert "--models: expected names from logistic, mlp, cnn, gru, fundl_cnn, fundl_lstm" in capsys.readouterr().err


@pytest.mark.slow
def test_render_only_rewrites_the_markdown_from_the_json(report):
    _, md, tmp, _ = report
    (tmp / "docs" / "reproduction.md").write_text("stale")
    assert reproduce_mnist1d.main(["--render-only", "--out-dir", str(tmp / "docs")]) == 0
    assert (tmp / "docs" / "reproduction.md").read_text() == md


def test_findings_explain_a_model_below_the_paper_with_the_experiments_run():
    """The paragraph for a model below the paper names the paper's code run here, the variant and
    the paper's own logs, with their numbers."""
    script = reproduce_mnist1d
    result = {"seeds": [0, 1], "test_accuracy": [0.90, 0.92], "best_eval_accuracy": [], "steps": 6000,
              "num_params": 5210, "wall_seconds": 1.0}
    r = script.row("cnn", result, {"seeds": [0, 1], "test_accuracy": [0.93, 0.94], "wall_seconds": 1.0})
    r["variant"] = {"overrides": ["data.shuffle=true"], **script._with_stats({"test_accuracy": [0.91, 0.93]})}
    assert r["below_paper"] and r["mean"] == pytest.approx(0.91)
    (text,) = script.findings([r])
    assert "**CNN (paper's)**: 91.0 ± 1.4 against the paper's 94 (3.0 points below)" in text
    assert "gives 93.5 ± 0.7: fundl is 2.5 points below it." in text
    assert "with `data.shuffle=true`, trained the same way: 92.0 ± 1.4." in text
    assert "log 92.5 (2020) and 92.3 (2024)" in text
