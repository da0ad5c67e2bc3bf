"""Bad input, everywhere: each error says what was expected, what was got and where.

One test per case of the audit (API and command line).  CLI tests assert the
exit code (2: bad input -- a command line, config or data that cannot run; 1: a failure while running) and that
the message comes without a traceback.
"""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fundl import models
from fundl.run import config as cfg
from fundl.run import experiment
from fundl.run.build import check_labels
from fundl.data import Dataset, Loader, load_dataset
from fundl.data.errors import DataError
from fundl.nn.core import ShapeError
from fundl.train import checkpoint as ckpt
from fundl.train.loop import fit
from fundl.train.placement import local_batches_divisible
from fundl.train.state import create_train_state
from fundl.train.step import make_train_step
from test_checkpoint import data_file  # the biggest array-data file under state/
from conftest import ROOT

# One xdist worker runs this file, so its module-scoped fixtures run once under `make test` (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_errors")

TINY = "configs/tiny_synthetic.toml"


def cli(*args, env=None, timeout=120):
    env = {**os.environ, "MPLBACKEND": "Agg", **(env or {})}
    env.pop("FUNDL_TRACEBACK", None)
    return subprocess.run([sys.executable, "scripts/train.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def train_here(capsys, monkeypatch):
    """``fundl-train``'s main (``fundl.run.cli.train_main``) run in this process from the repository
    root: the command line's own code without a process's start-up.  Returns what ``cli`` returns
    (a ``subprocess.CompletedProcess``: returncode, stdout, stderr).  Runs that need their own
    devices, a fault driver or a fresh process stay in ``cli``."""
    from fundl.run.cli import train_main

    monkeypatch.delenv("FUNDL_TRACEBACK", raising=False)
    monkeypatch.chdir(ROOT)

    def run(*args):
        capsys.readouterr()
        code = train_main([str(a) for a in args])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


def tiny_config(*overrides):
    return cfg.load_config(ROOT / TINY, ["logging.plots=false", "training.eval_every=0", *overrides])


EIGHT = ("training.steps=8", "training.checkpoint_every=4")  # the finished run the resume tests start from


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 8-step run (checkpoints at 4 and 8), trained once per module in this process."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert experiment.run(tiny_config(*EIGHT), run, verbose=False)["final_step"] == 8
    return run


@pytest.fixture
def eight(finished, tmp_path):
    """This test's copy of the finished 8-step run."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


# ------------------------------------------------------ model inputs (API)
def test_wrong_input_shape_names_the_layer_expected_and_got():
    model = models.mlp([16], 3)
    params, state, _ = model.init(jax.random.key(0), (1, 8))
    with pytest.raises(ShapeError, match=r"at layer 'dense_0': expected input of shape \(\.\.\., 8\), got shape \(4, 9\)"):
        model.apply(params, state, jnp.ones((4, 9)))


def test_wrong_input_rank_at_init_names_the_layer():
    with pytest.raises(ShapeError, match=r"at layer 'conv2d_0'.*rank 4.*got \(1, 8\)"):
        models.cnn([4], [8], 3, nd=2).init(jax.random.key(0), (1, 8))


@pytest.mark.slow
def test_float_token_ids_are_rejected_by_the_embedding():
    model = models.char_lm(10, embed_dim=4, hidden=8)
    params, state, _ = model.init(jax.random.key(0), (1, 5))
    with pytest.raises(ShapeError, match="embedding expects integer ids, got dtype float32"):
        model.apply(params, state, jnp.ones((1, 5), jnp.float32))


def test_integer_inputs_to_a_dense_model_are_rejected():
    model = models.mlp([16], 3)
    params, state, _ = model.init(jax.random.key(0), (1, 8))
    with pytest.raises((TypeError, ShapeError), match="dtype"):
        model.apply(params, state, jnp.ones((4, 8), jnp.int32))


@pytest.mark.slow
def test_a_model_that_does_not_fit_the_data_fails_readably_in_the_cli(tmp_path, train_here):
    r = train_here("--config", TINY, "--run-dir", str(tmp_path / "run"), "--quiet", "--set", "model.kind='cnn'")
    assert r.returncode == 2  # bad input: the config's model does not fit its data
    assert "error: ShapeError: at layer 'conv2d_0'" in r.stderr and "got (1, 16)" in r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------- labels
def _with_labels(y_train):
    ds = load_dataset("synthetic", num_train=64, num_test=16, input_shape=(8,), num_classes=3, seed=0)
    return Dataset(ds.name, {**ds.train, "y": y_train}, ds.test, ds.num_classes, ds.input_shape, ds.meta)


def test_labels_outside_the_class_range_are_found_before_training(tmp_path, monkeypatch):
    y = np.zeros(64, np.int32)
    y[[5, 9]] = [3, -1]
    monkeypatch.setattr(experiment, "load_data", lambda config: _with_labels(y))
    with pytest.raises(DataError) as info:
        experiment.run(tiny_config(), tmp_path, verbose=False)
    assert str(info.value) == ("dataset 'synthetic', train split: 2 labels outside the class range [0, 3); "
                               "the first is 3 at index 5. Labels must be integer class ids 0..2")
    assert not (tmp_path / "checkpoints").exists()  # nothing trained


def test_float_labels_are_rejected():
    with pytest.raises(DataError, match="train split: labels must be integer class ids, got dtype float32"):
        check_labels(_with_labels(np.zeros(64, np.float32)))


# ---------------------------------------------------------------- devices
def test_global_batch_not_divisible_by_the_device_count():
    with pytest.raises(ValueError, match="global batch size 30 must be divisible by the number of devices 4"):
        local_batches_divisible(30, 4)


@pytest.mark.slow
def test_global_batch_not_divisible_in_the_cli_exits_2_before_training(tmp_path):
    """(Also the command-line check of tests/test_parallel.py: its in-process test checks the placements.)"""
    r = cli("--config", TINY, "--run-dir", str(tmp_path / "run"), "--quiet", "--set", "parallel.mode='pmap'",
            "--set", "training.batch_size=30", "--local-devices", "4")
    assert r.returncode == 2, r.stderr
    assert "training.batch_size" in r.stderr and "batch size 30 must be divisible by the number of devices 4" in r.stderr
    assert "28 or 32" in r.stderr  # the nearest sizes that divide
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------- configs
def test_mistyped_config_value_in_the_cli_exits_2_naming_the_key(tmp_path):
    r = cli("--config", TINY, "--run-dir", str(tmp_path / "x"), "--set", "training.steps='ten'")
    assert r.returncode == 2
    assert "training.steps" in r.stderr and "must be of type int" in r.stderr and "'ten'" in r.stderr
    assert not (tmp_path / "x").exists()


def test_unknown_config_section_in_a_file_exits_2_with_suggestion(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / TINY).read_text() + "\n[trainign]\nsteps = 3\n")
    r = cli("--config", str(bad), "--run-dir", str(tmp_path / "x"))
    assert r.returncode == 2
    assert f"unknown config section [trainign] in {bad}" in r.stderr and "Did you mean 'training'?" in r.stderr


def test_malformed_set_exits_2():
    r = cli("--config", TINY, "--set", "steps=3")
    assert r.returncode == 2 and "--set expects section.key=value, got 'steps=3'" in r.stderr


def test_missing_config_exits_2():
    r = cli("--config", "configs/nope.toml")
    assert r.returncode == 2 and "config file configs/nope.toml does not exist" in r.stderr


# -------------------------------------------------------------- run dirs
def test_a_run_directory_that_cannot_be_created_is_reported_cleanly(tmp_path, train_here):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    r = train_here("--config", TINY, "--run-dir", str(blocker / "run"), "--quiet")
    assert r.returncode == 1
    assert f"run directory {blocker / 'run'} is not writable" in r.stderr and "--run-dir" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_a_read_only_run_directory_is_reported_cleanly(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        r = cli("--config", TINY, "--run-dir", str(ro), "--quiet")
    finally:
        ro.chmod(0o700)
    assert r.returncode == 1 and f"run directory {ro} is not writable" in r.stderr


@pytest.mark.slow
def test_disk_full_during_a_save_in_the_cli(tmp_path, train_here, monkeypatch):
    from fundl.train.checkpoint.saver import Checkpointer

    real_commit = Checkpointer._commit  # fundl's commit, once Orbax's background write has finished

    def commit(self):  # Orbax's write of checkpoint 8 fails the way TensorStore reports a full disk
        if self.pending.name == "step_00000008":
            raise ValueError('DATA_LOSS: Error writing "params/w/0" in OCDBT database: Failed to write '
                             "4096 bytes to file 11: No space left on device [os_error_code='28']")
        real_commit(self)

    monkeypatch.setattr(Checkpointer, "_commit", commit)
    run = tmp_path / "run"
    r = train_here("--config", TINY, "--run-dir", str(run), "--quiet", "--set", "training.checkpoint_every=4")
    assert r.returncode == 1
    assert f"could not write checkpoint {run / 'checkpoints' / 'step_00000008'}: No space left on device" in r.stderr
    assert f"the newest intact checkpoint is {run / 'checkpoints' / 'step_00000004'}" in r.stderr
    assert "Traceback" not in r.stderr
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step")] == ["step_00000004"]
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert ckpt.latest_valid(run / "checkpoints").name == "step_00000004"


# ---------------------------------------------------------------- resume
@pytest.mark.slow
def test_resume_refuses_a_changed_structure_with_the_keys_and_allows_more_steps(eight):
    run = eight
    with pytest.raises(cfg.ConfigError) as info:
        experiment.run(tiny_config(*EIGHT, "training.steps=12", "training.resume=true", "model.hidden=[32]",
                                   "optimizer.name='sgd'"), run, verbose=False,
                       allow_changes=["model", "training.steps"])  # structure cannot be allowed
    msg = str(info.value)
    assert f"cannot resume {run}" in msg
    assert "model.hidden: [16] -> [32]" in msg and 'optimizer.name: "adam" -> "sgd"' in msg
    assert "training" not in msg  # only the structural keys are listed
    summary = experiment.run(tiny_config(*EIGHT, "training.steps=12", "training.resume=true"), run, verbose=False,
                             allow_changes=["training.steps"])
    assert summary["final_step"] == 12 and ckpt.latest_valid(run / "checkpoints").name == "step_00000012"


def test_resume_with_a_corrupt_newest_checkpoint_falls_back_with_a_warning(eight):
    run = eight
    newest = run / "checkpoints" / "step_00000008"
    data = data_file(newest)
    data.write_bytes(data.read_bytes()[:100])
    with pytest.warns(UserWarning, match=f"skipping corrupt checkpoint: checkpoint {data} is corrupt"):
        summary = experiment.run(tiny_config("training.steps=8", "training.checkpoint_every=4",
                                             "training.resume=true"), run, verbose=False)
    assert summary["final_step"] == 8 and ckpt.latest_valid(run / "checkpoints") == newest  # rewritten


@pytest.mark.slow
def test_resume_with_every_checkpoint_corrupt_exits_1_listing_them(eight, train_here):
    run = eight
    for p in ckpt.list_checkpoints(run / "checkpoints"):
        data_file(p).write_bytes(b"garbage")
    r = train_here("--resume", str(run), "--quiet")
    assert r.returncode == 1
    skipped = [line for line in r.stderr.splitlines() if "skipping corrupt checkpoint" in line]
    assert len(skipped) == 2 and all(line.startswith("fundl: warning: ") for line in skipped)  # one per checkpoint
    assert f"CheckpointError: no valid checkpoint in {run / 'checkpoints'}" in r.stderr
    assert "step_00000004" in r.stderr and "step_00000008" in r.stderr and "Traceback" not in r.stderr


def test_resume_of_a_directory_that_is_not_a_run_exits_2(tmp_path):
    r = cli("--resume", str(tmp_path))
    assert r.returncode == 2 and f"{tmp_path / 'config.toml'} does not exist" in r.stderr


def test_resume_and_run_dir_naming_different_directories_exit_2(tmp_path):
    r = cli("--resume", str(tmp_path / "a"), "--run-dir", str(tmp_path / "b"))
    assert r.returncode == 2 and "name different run directories" in r.stderr


def test_resuming_past_the_requested_steps_is_explained(eight):
    with pytest.raises(cfg.ConfigError, match="its checkpoint is at step 8, past the 4 steps this config asks for"):
        experiment.run(tiny_config(*EIGHT, "training.steps=4", "training.resume=true"), eight, verbose=False,
                       allow_changes=["training.steps"])


# ------------------------------------------------------------- fit (API)
def test_fit_rejects_an_unknown_nan_policy():
    ds = load_dataset("synthetic", num_train=64, num_test=16, input_shape=(8,), num_classes=3, seed=0)
    model, opt = models.mlp([4], 3), optax.adam(1e-2)
    state = create_train_state(model, opt, jax.random.key(0), (1, 8))
    with pytest.raises(ValueError, match="nan_policy must be 'stop', 'skip' or 'ignore', got 'skp'"):
        fit(state, make_train_step(model, opt), Loader(ds.train, 16, drop_last=True, prefetch=0),
            num_steps=2, nan_policy="skp", progress=False)
