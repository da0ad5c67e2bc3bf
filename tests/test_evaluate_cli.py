"""scripts/evaluate.py (fundl.run.cli.evaluate_main): config and checkpoint errors are one clear
message and an exit code (2: config, 1: checkpoint or data), not a traceback; --debug / FUNDL_DEBUG=1 shows it."""

import json
import shutil

import pytest

from fundl.run.cli import evaluate_main, train_main
from conftest import ROOT

# One xdist worker runs this file, so its module-scoped fixtures run once under `make test` (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_evaluate_cli")



@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "tiny"
    code = train_main(["--config", str(ROOT / "configs/tiny_synthetic.toml"), "--run-dir", str(path),
                                  "--set", "training.steps=4", "--set", "training.checkpoint_every=2",
                                  "--set", "logging.plots=false", "--quiet"])
    assert code == 0
    return path


@pytest.fixture
def copy(run_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("FUNDL_TRACEBACK", raising=False)
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def _edit_config(run, old, new):
    config = run / "config.toml"
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new, 1))


@pytest.mark.slow
def test_evaluates_the_latest_checkpoint(copy, capsys):
    assert evaluate_main([str(copy)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 4 and 0.0 <= out["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_unknown_config_key_is_a_config_error_exit_2(copy, capsys):
    _edit_config(copy, "[training]\n", "[training]\nstepz = 3\n")
    assert evaluate_main([str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fundl: error: unknown key 'training.stepz'") and "Did you mean 'steps'?" in err
    assert "Traceback" not in err


def _corrupt(checkpoint):
    """Append a byte to the biggest array-data file of the checkpoint's Orbax state/ folder."""
    files = [f for f in (checkpoint / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    with open(max(files, key=lambda f: f.stat().st_size), "ab") as f:
        f.write(b"x")


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(copy, capsys):
    _corrupt(copy / "checkpoints" / "step_00000004")
    assert evaluate_main([str(copy)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["step"] == 2
    assert err.startswith("fundl: warning: skipping corrupt checkpoint") and "step_00000004" in err


@pytest.mark.slow
def test_all_checkpoints_corrupt_is_exit_1(copy, capsys):
    for checkpoint in (copy / "checkpoints").glob("step_*"):
        _corrupt(checkpoint)
    assert evaluate_main([str(copy)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fundl: error: CheckpointError: no valid checkpoint in") and "sha256" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2  # one line and at most a hint


@pytest.mark.slow
def test_checkpoint_that_does_not_fit_the_model_is_exit_1(copy, capsys):
    _edit_config(copy, "hidden = [16]", "hidden = [32]")
    assert evaluate_main([str(copy)]) == 1
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "params/dense_0/w" in err


@pytest.mark.slow
def test_no_checkpoint_is_exit_1(copy, capsys):
    shutil.rmtree(copy / "checkpoints")
    (copy / "checkpoints").mkdir()
    assert evaluate_main([str(copy)]) == 1
    assert "no checkpoint in" in capsys.readouterr().err


def test_not_a_run_directory_is_exit_2(tmp_path, capsys):
    assert evaluate_main([str(tmp_path)]) == 2
    assert "has no config.toml" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("how", ["--debug", "FUNDL_DEBUG", "FUNDL_TRACEBACK"])
def test_debug_shows_the_traceback(copy, monkeypatch, capsys, how):
    _edit_config(copy, "[training]\n", "[training]\nstepz = 3\n")
    if how != "--debug":
        monkeypatch.setenv(how, "1")
    assert evaluate_main([str(copy)] + (["--debug"] if how == "--debug" else [])) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err and "fundl: error: unknown key 'training.stepz'" in err
