"""scripts/train.py and scripts/evaluate.py (fundl-train, fundl-evaluate) end to end on a tiny config."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

# One xdist worker runs this file, so its module-scoped fixtures run once under `make test` (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_cli")



def run(*args, timeout=300):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    r = run("scripts/train.py", "--config", "configs/tiny_synthetic.toml", "--run-dir", str(run_dir), "--quiet")
    assert r.returncode == 0, r.stderr
    return run_dir, r.stdout


@pytest.mark.slow
def test_train_writes_the_whole_run_directory(tiny_run):
    run_dir, stdout = tiny_run
    assert "test accuracy" in stdout
    for name in ("config.toml", "metrics.jsonl", "summary.json", "curves.png"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("final_step", "epochs", "test_accuracy", "test_loss", "train_seconds",
                "examples_per_second", "num_params", "config_path"):
        assert key in summary, key
    assert summary["final_step"] == 24 and summary["num_params"] == 340
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] and not (run_dir / "checkpoints" / "latest").exists()
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [4, 8, 12, 16, 20, 24]
    assert [r["step"] for r in evals] == [12, 24]
    for r in records:
        assert {"step", "split", "loss", "accuracy", "wall_time", "epoch"} <= set(r)
    assert evals[-1]["accuracy"] == summary["test_accuracy"]


@pytest.mark.slow
def test_evaluate_reproduces_summary_accuracy(tiny_run):
    run_dir, _ = tiny_run
    r = run("scripts/evaluate.py", str(run_dir))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert out["step"] == 24
    assert out["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)
    assert out["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-6)


@pytest.mark.slow
def test_metrics_load_into_pandas_when_installed(tiny_run):
    pd = pytest.importorskip("pandas")
    from fundl.run.rundir import load_metrics

    df = load_metrics(tiny_run[0])
    assert isinstance(df, pd.DataFrame) and {"step", "split", "loss"} <= set(df.columns)


def test_bad_config_key_exits_2_with_suggestion(tmp_path):
    r = run("scripts/train.py", "--config", "configs/tiny_synthetic.toml", "--set", "training.stepz=3",
            "--run-dir", str(tmp_path / "x"))
    assert r.returncode == 2
    assert "Did you mean 'steps'?" in r.stderr
    assert not (tmp_path / "x").exists()  # nothing heavy ran, nothing written


@pytest.mark.slow
def test_tensorboard_event_files_when_asked(tmp_path):
    """The run layer's logging (in this process: the command line itself is tested above)."""
    pytest.importorskip("tensorboardX")
    from fundl.run import config as cfg
    from fundl.run import experiment

    run_dir = tmp_path / "tb"
    config = cfg.load_config(ROOT / "configs" / "tiny_synthetic.toml",
                             ["logging.tensorboard=true", "logging.plots=false", "training.steps=8"])
    assert experiment.run(config, run_dir, verbose=False)["final_step"] == 8
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert not (run_dir / "curves.png").exists()


def test_console_entry_points_name_the_functions_the_scripts_call():
    """pyproject's [project.scripts] (fundl-train, fundl-evaluate, ...) and scripts/*.py run the same mains."""
    import importlib
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"fundl-train", "fundl-evaluate", "fundl-launch-local", "fundl-reproduce-mnist1d"} <= set(scripts)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
    assert "fundl.run.cli import train_main" in (ROOT / "scripts" / "train.py").read_text()
    assert "fundl.run.cli import evaluate_main" in (ROOT / "scripts" / "evaluate.py").read_text()
    for script in ("train", "evaluate", "launch_local", "reproduce_mnist1d"):
        text = (ROOT / "scripts" / f"{script}.py").read_text()
        assert len(text.splitlines()) <= 15 and "sys.path" not in text, script  # thin wrappers


def test_help_names_the_console_script_when_installed():
    r = run("scripts/train.py", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: train.py") and "fundl-train" in r.stdout
    r = run("scripts/evaluate.py", "--help")
    assert r.returncode == 0 and "fundl-evaluate" in r.stdout
