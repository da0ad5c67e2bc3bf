"""Resume never silently changes the run: every config difference is classified and
trajectory changes need an explicit --allow-change, with their effect printed."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from fundl.run import config as cfg
from fundl.run import experiment
from fundl.run.optimizer import schedule_from_config
from fundl.run.resume import config_changes, describe_effects
from fundl.run.rundir import read_metrics
from fundl.train import checkpoint as ckpt
from test_errors import train_here  # noqa: F401 - a fixture: fundl-train's main in this process
from conftest import ROOT

# One xdist worker runs this file, so its module-scoped fixtures run once under `make test` (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_resume")

TINY = "configs/tiny_synthetic.toml"


def tiny_config(*overrides):
    return cfg.load_config(ROOT / TINY, ["logging.plots=false", *overrides])


def cli(*args, timeout=180):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    env.pop("FUNDL_TRACEBACK", None)
    return subprocess.run([sys.executable, "scripts/train.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


COSINE = ("training.steps=8", 'schedule.name="cosine"')  # the settings of the run every test here resumes


@pytest.fixture(scope="module")
def cosine_base(tmp_path_factory):
    """A finished 8-step run with a cosine schedule (the README's 'train with fewer epochs' run),
    trained once in this process; each test resumes its own copy (the command line's resume is
    tested below)."""
    run = tmp_path_factory.mktemp("cosine") / "run"
    assert experiment.run(tiny_config(*COSINE, "training.checkpoint_every=4"), run, verbose=False)["final_step"] == 8
    return run


@pytest.fixture
def cosine_run(cosine_base, tmp_path):
    """This test's copy of the finished cosine run."""
    run = tmp_path / "run"
    shutil.copytree(cosine_base, run)
    return run


@pytest.mark.slow
def test_the_checkpoint_records_the_resolved_config(cosine_run):
    manifest = ckpt.read_manifest(ckpt.latest_valid(cosine_run / "checkpoints"))
    assert manifest["extras"]["config"] == cfg.load_config(cosine_run / "config.toml")
    assert manifest["extras"]["config"]["schedule"]["name"] == "cosine"
    assert len(manifest["extras"]["run_id"]) == 12


@pytest.mark.slow
def test_resuming_with_more_steps_is_refused_without_allow_change(cosine_run, train_here):
    """The audit's case: the file's longer run stretches the cosine schedule mid-run."""
    before = (cosine_run / "config.toml").read_text()
    r = train_here("--resume", str(cosine_run), "--quiet", "--set", "training.steps=16")
    assert r.returncode == 2
    assert f"cannot resume {cosine_run} as asked" in r.stderr and "training.steps: 8 -> 16" in r.stderr
    assert "--allow-change training.steps" in r.stderr and "Traceback" not in r.stderr
    assert (cosine_run / "config.toml").read_text() == before  # nothing written
    assert ckpt.step_of(ckpt.latest_valid(cosine_run / "checkpoints")) == 8


@pytest.mark.slow
def test_an_allowed_change_prints_its_effect_on_the_schedule(cosine_run, train_here):
    r = train_here("--resume", str(cosine_run), "--quiet", "--set", "training.steps=16", "--allow-change", "training.steps")
    assert r.returncode == 0, r.stderr
    old = tiny_config("training.steps=8", 'schedule.name="cosine"')
    new = tiny_config("training.steps=16", 'schedule.name="cosine"')
    was, becomes = float(schedule_from_config(old, 8)(8)), float(schedule_from_config(new, 16)(8))
    assert was == pytest.approx(0.0) and becomes == pytest.approx(0.005)
    # on stderr, even with --quiet: the run now differs from the checkpoint's
    assert "fundl: resume changes training.steps: 8 -> 16 (trajectory)" in r.stderr
    assert "fundl: the run now ends at step 16 (was 8)" in r.stderr
    assert (f"fundl: the cosine schedule is re-spanned from 8 to 16 steps; the learning rate at step 8 becomes "
            f"{becomes:.6g} (was {was:.6g})") in r.stderr
    # the run directory shows what is actually being run, and the log records the change
    assert cfg.load_config(cosine_run / "config.toml")["training"]["steps"] == 16
    resumes = [rec for rec in read_metrics(cosine_run) if rec["split"] == "resume"]
    assert resumes == [{**resumes[0], "step": 8, "changes": {"training.steps": [8, 16]}}]
    assert json.loads((cosine_run / "summary.json").read_text())["final_step"] == 16


@pytest.mark.slow
@pytest.mark.parametrize("override,key", [
    ("optimizer.learning_rate=0.1", "optimizer.learning_rate"),
    ('schedule.name="constant"', "schedule.name"),
    ("training.seed=3", "training.seed"),
    ("training.batch_size=16", "training.batch_size"),
    ("data.num_train=200", "data.num_train"),
])
def test_every_trajectory_setting_is_refused_then_allowed(cosine_run, override, key):
    run = cosine_run
    config = tiny_config(*COSINE, "training.resume=true", override)
    with pytest.raises(cfg.ConfigError, match=f"--allow-change {key}"):
        experiment.run(config, run, verbose=False)
    section = key.split(".")[0]
    summary = experiment.run(config, run, verbose=False, allow_changes=[section])  # a whole section
    assert summary["final_step"] == 8


@pytest.mark.slow
def test_structure_changes_are_refused_even_when_allowed(cosine_run):
    for override in ("model.hidden=[8]", 'optimizer.name="sgd"', 'training.nan_policy="skip"'):
        with pytest.raises(cfg.ConfigError, match="changes the model, the optimiser's kind or the train state"):
            experiment.run(tiny_config(*COSINE, "training.resume=true", override), cosine_run,
                           verbose=False, allow_changes=["model", "optimizer", "training"])


@pytest.mark.slow
def test_cosmetic_changes_need_no_flag(cosine_run):  # saved with checkpoint_every=4
    summary = experiment.run(tiny_config(*COSINE, "training.checkpoint_every=2", "training.resume=true",
                                         "training.log_every=2", "training.progress=false", "data.prefetch=0",
                                         "training.steps_per_call=2"), cosine_run, verbose=False)
    assert summary["final_step"] == 8


def test_unknown_allow_change_names_are_errors(tmp_path):
    with pytest.raises(cfg.ConfigError, match="--allow-change 'training.epoch' names no setting"):
        experiment.run(tiny_config("training.resume=true"), tmp_path, verbose=False, allow_changes=["training.epoch"])
    r = cli("--config", TINY, "--run-dir", str(tmp_path / "x"), "--allow-change", "training.steps")
    assert r.returncode == 2 and "--allow-change applies to a resumed run" in r.stderr


def test_a_saved_loader_position_that_disagrees_with_the_step_is_an_error(cosine_run):
    path = ckpt.latest_valid(cosine_run / "checkpoints")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["extras"]["loader"] == {"epoch": 1, "index": 0, "seed": 0, "batch_size": 32,
                                            "num_examples": 256}
    manifest["extras"]["loader"]["index"] = 3  # as if the loader's order function had changed
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match=r"data position saved in .* does not match .* \(index: saved 3, "
                                                   r"recomputed 0\)"):
        experiment.run(tiny_config(*COSINE, "training.resume=true"), cosine_run, verbose=False)


@pytest.mark.slow
def test_a_checkpoint_without_a_recorded_config_is_compared_with_config_toml(cosine_run):
    """Checkpoints written before configs were recorded in them still resume, and are still checked."""
    path = ckpt.latest_valid(cosine_run / "checkpoints")
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["extras"]["config"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(cfg.ConfigError, match="optimizer.learning_rate: 0.01 -> 0.02"):
        experiment.run(tiny_config(*COSINE, "training.resume=true", "optimizer.learning_rate=0.02"),
                       cosine_run, verbose=False)
    assert experiment.run(tiny_config(*COSINE, "training.resume=true"), cosine_run,
                          verbose=False)["final_step"] == 8


def test_effects_in_words():
    saved = tiny_config("training.steps=400", 'schedule.name="cosine"')
    config = tiny_config("training.steps=6000", 'schedule.name="cosine"', "training.seed=2")
    changes = config_changes(saved, config)
    assert [c.name for c in changes] == ["training.seed", "training.steps"]
    lines = describe_effects(changes, saved, config, step=400, old_total=400, new_total=6000)
    assert lines[0] == "the run now ends at step 6000 (was 400)"
    assert lines[1].startswith("the cosine schedule is re-spanned from 400 to 6000 steps; the learning rate at "
                               "step 400 becomes 0.00989074 (was 0)")  # 0.01 * (1 + cos(pi * 400/6000)) / 2
    assert "the data order from step 400 on differs" in lines[2]


def test_a_dp_run_refuses_a_changed_sampling_rate_even_when_allowed():
    from fundl.run.resume import Change, check_changes

    changes = [Change("training", "batch_size", 100, 200)]
    check_changes(changes, ["training"], "runs/x")  # an ordinary run: allowed when confirmed
    with pytest.raises(cfg.ConfigError, match="one epsilon computed from one sampling rate"):
        check_changes(changes, ["training"], "runs/x", privacy=True)
