"""The notebooks in notebooks/ run top to bottom in a Jupyter kernel, and say what they should.

Each test executes one notebook with nbclient (kernel ``python3``, working directory
``notebooks/``) at tiny settings (``FUNDL_NOTEBOOK_STEPS=30``), fails on any cell
error (nbclient raises ``CellExecutionError`` naming the cell), then reads the
numbers the notebook computed -- its ``results`` dict, printed by one extra cell
appended here -- and checks them, and that its plots were drawn. A separate test
checks that the committed notebooks carry the outputs of a complete run.
"""

import json
import math
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
STEPS = 30
MARK = "FUNDL_NOTEBOOK_RESULTS="


def images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def execute(name: str, tmp_path, monkeypatch):
    """Run notebooks/NAME at tiny settings; return (executed notebook, its results dict)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(f"import json\nprint({MARK!r} + json.dumps(results))"))
    monkeypatch.setenv("FUNDL_NOTEBOOK_STEPS", str(STEPS))
    monkeypatch.setenv("FUNDL_NOTEBOOK_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend: plots become outputs
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    line = next((l for l in text.splitlines() if l.startswith(MARK)), None)
    assert line is not None, f"the results cell printed no results: {text!r}"
    return nb, json.loads(line[len(MARK):])


def finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


@pytest.mark.slow
def test_quickstart_notebook_runs_and_learns(tmp_path, monkeypatch):
    nb, r = execute("quickstart.ipynb", tmp_path, monkeypatch)
    assert r["steps"] == STEPS
    assert r["num_params"] == 12_298  # the CNN of the notebook: 3 convs of 32, group norm, dense 10
    # 30 Adam steps already beat chance (0.1; measured 0.25) and the uniform prediction's loss (log 10)
    assert 0.15 < r["test_accuracy"] <= 1.0
    assert finite(r["test_loss"]) and r["test_loss"] < math.log(10)
    # per-example gradients: their mean is the batch gradient; fundl's transform equals vmap(grad)
    assert r["per_example_vs_batch_grad"] < 1e-5
    assert r["per_example_grads_vs_vmap"] < 1e-5
    assert images(nb) >= 3  # data, curves, gradient norms
    assert (tmp_path / "run" / "metrics.jsonl").exists()  # fit wrote to the run directory it was given


@pytest.mark.slow
def test_transforms_notebook_runs_and_its_numbers_hold(tmp_path, monkeypatch):
    nb, r = execute("transforms.ipynb", tmp_path, monkeypatch)
    assert r["steps"] == STEPS
    members = r["member_test_losses"]
    assert len(members) == 5 and finite(*members, r["ensemble_test_loss"])
    # the ensemble predicts the mean of the members' probabilities: by Jensen's inequality its
    # cross-entropy is at most the members' mean cross-entropy
    assert r["ensemble_test_loss"] <= sum(members) / len(members) + 1e-6
    assert 0.15 < r["ensemble_test_accuracy"] <= 1.0
    assert r["sweep_rows"] == 14  # 7 learning rates x 2 seeds, one program
    assert r["sweep_best_learning_rate"] in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    # over a few steps the validation loss is smooth in log(lr): the meta-gradients through
    # unrolled_training average to the slope of the loss's trend, and agree with it in sign on the grid
    assert r["window_roughness"] < 1e-3
    assert abs(r["window_mean_meta_gradient"] - r["window_trend_slope"]) < 0.1 * abs(r["window_trend_slope"])
    losses, grads = r["grid_val_losses"], r["grid_meta_gradients"]
    assert grads[0] < 0 and losses[1] < losses[0]  # from 1e-4, a larger rate lowers the loss
    assert finite(r["learned_learning_rate"]) and 1e-4 * 0.999 <= r["learned_learning_rate"] <= 1.0
    assert 0.0 <= r["flipped_label_auc"] <= 1.0
    assert images(nb) >= 6


@pytest.mark.parametrize("name", ["quickstart.ipynb", "transforms.ipynb", "gpt.ipynb"])
def test_committed_notebooks_carry_the_outputs_of_a_complete_run(name):
    """The .ipynb files are what researchers open: they keep the outputs (plots included) of one
    uninterrupted run at the default settings, with no errors; re-run a notebook after editing it."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run top to bottom once, then save"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert images(nb) >= 3
    default = re.search(r'FUNDL_NOTEBOOK_STEPS", (\d+)\)', "".join(c.source for c in code)).group(1)
    printed = "".join(o.get("text", "") for c in code[:3] for o in c.outputs)
    assert f"{default} steps" in printed, f"the saved outputs are not from a run at the default {default} steps"


@pytest.mark.slow
def test_gpt_notebook_trains_samples_and_its_cache_agrees(tmp_path, monkeypatch):
    monkeypatch.setenv("FUNDL_NOTEBOOK_VALIDATION_WINDOWS", "128")  # 128 of its 871 validation windows
    nb, r = execute("gpt.ipynb", tmp_path, monkeypatch)
    assert r["steps"] == STEPS
    vocab = r["vocab_chars"]
    assert r["vocab_size"] == len(vocab) == len(set(vocab))
    # 30 AdamW steps already beat the uniform prediction's loss, log(vocab) (measured about 3.3 vs 4.17)
    assert finite(r["val_loss"], *r["val_losses"]) and r["val_loss"] < math.log(r["vocab_size"])
    assert 0.0 <= r["val_accuracy"] <= 1.0
    # three samples: the prompt followed by SAMPLE_TOKENS new ids, decoded to text of the vocabulary
    batch, length = r["sample_shape"]
    assert batch == 3 and length == len("ROMEO:") + 500 and r["sample_prefix_ok"]
    assert len(r["sample_text"]) == length and r["sample_text"].startswith("ROMEO:")
    assert set(r["sample_text"]) <= set(vocab)
    # greedy decoding through the KV cache gives the tokens of recomputing the whole context each step
    assert r["greedy_matches_recompute"] and r["greedy_length"] > len("ROMEO:")
    # per-position losses average to the evaluated loss (same windows; evaluate pads, this drops the tail)
    by_position = r["loss_by_position"]
    assert len(by_position) > 1 and finite(*by_position)
    assert abs(sum(by_position) / len(by_position) - r["val_loss"]) < 0.05
    assert images(nb) >= 3  # the learning curves, the schedule, the loss by position
