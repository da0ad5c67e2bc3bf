"""Run directories: a fresh run never writes into an earlier run, two runs never share one,
and keep-K pruning only ever deletes this run's own checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import optax
import pytest

from fundl import models
from fundl.run import config as cfg
from fundl.run import experiment
from fundl.run.rundir import RunDir, RunDirInUse, RunDirNotEmpty, read_metrics
from fundl.train import checkpoint as ckpt
from fundl.train.state import create_train_state
from test_errors import train_here  # noqa: F401 - a fixture: fundl-train's main in this process
from conftest import ROOT

# One xdist worker runs this file, so its module-scoped fixtures run once under `make test` (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_rundir")

TINY = "configs/tiny_synthetic.toml"


def cli(*args, script="scripts/train.py", timeout=180):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    env.pop("FUNDL_TRACEBACK", None)
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def tiny_config(*overrides):
    return cfg.load_config(ROOT / TINY, ["logging.plots=false", *overrides])


def snapshot(path: Path) -> dict:
    """Every file under ``path`` with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of the tiny config (24 steps, checkpoints at 12 and 24), trained once per module."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert experiment.run(tiny_config(), run, verbose=False)["final_step"] == 24
    return run


@pytest.fixture
def earlier_run(finished, tmp_path):
    """This test's copy of the finished run, in tmp_path/run."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


# ----------------------------------------------------- a fresh run refuses
@pytest.mark.slow
def test_a_fresh_run_into_an_earlier_run_refuses_and_touches_nothing(earlier_run, capsys, train_here):
    """The README's flow: train, then train again into the same (default) run directory."""
    from fundl.run.cli import evaluate_main

    run = earlier_run
    before = snapshot(run)
    r = train_here("--config", TINY, "--run-dir", str(run), "--quiet", "--set", "training.steps=8")
    assert r.returncode == 2, r.stderr
    msg = r.stderr
    assert f"run directory {run} already holds a run (2 checkpoint(s), steps 12..24" in msg
    assert "metrics.jsonl with" in msg and "summary.json (a finished run)" in msg
    assert f"--resume {run}" in msg and "--run-dir NEW_DIR" in msg and "--overwrite" in msg
    assert "Traceback" not in msg
    after = snapshot(run)
    before.pop(".lock"), after.pop(".lock")  # names whoever claimed the directory last
    assert after == before  # the earlier run is untouched
    # evaluate.py's main still reports the earlier run's model
    assert evaluate_main([str(run)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 24


@pytest.mark.slow
def test_overwrite_moves_the_earlier_run_aside_and_starts_afresh(earlier_run, tmp_path):
    run = earlier_run  # 24 steps
    before = snapshot(run)
    before.pop(".lock")
    summary = experiment.run(tiny_config("training.steps=8", "training.checkpoint_every=4"), run,
                             verbose=False, overwrite=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before  # moved, byte for byte, not deleted
    assert summary["final_step"] == 8
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000004", "step_00000008"]
    assert max(r["step"] for r in read_metrics(run)) == 8  # no record of the old run left in the new one


@pytest.mark.slow
def test_overwrite_through_the_cli_says_where_the_old_run_went(earlier_run, tmp_path, train_here):
    run = earlier_run
    r = train_here("--config", TINY, "--run-dir", str(run), "--quiet", "--overwrite", "--set", "training.steps=4",
            "--set", "logging.plots=false")
    assert r.returncode == 0, r.stderr
    aside = next(p for p in tmp_path.iterdir() if p.name.startswith("run.old-"))
    assert f"moved the earlier run in {run} aside to {aside}" in r.stderr
    r = cli("--resume", str(run), "--overwrite")
    assert r.returncode == 2 and "choose one" in r.stderr


def test_an_empty_or_missing_directory_is_a_fresh_run(tmp_path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "new" / "nested"):
        with RunDir(path) as rd:
            assert rd.moved_to is None


def test_library_users_get_the_same_refusal(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirNotEmpty, match="notes.txt"):
        RunDir(tmp_path)
    with RunDir(tmp_path, existing="resume"):
        pass
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ lock
@pytest.mark.slow
def test_a_second_concurrent_run_exits_at_once_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with RunDir(run):  # this process holds the run directory, as a live run would
        t0 = time.monotonic()
        r = cli("--config", TINY, "--run-dir", str(run), "--quiet", "--set", "training.resume=true")
        elapsed = time.monotonic() - t0
        assert r.returncode == 2, r.stderr
        assert f"run directory {run} is in use by another run (pid {os.getpid()} on" in r.stderr
        assert "Traceback" not in r.stderr
        assert elapsed < 60  # at once: no waiting for the lock (the bound only absorbs start-up on 2 loaded cores)
        with pytest.raises(RunDirInUse):
            RunDir(run, existing="resume")
    with RunDir(run, existing="resume"):  # released by close
        pass


HOLD = """
import time
from fundl.run.rundir import RunDir
rd = RunDir({run!r})
print("holding", flush=True)
time.sleep(120)
"""


def test_the_lock_dies_with_its_process(tmp_path):
    """SIGKILL releases the lock: a crashed run never blocks its resume."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(run=str(run))],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)  # fundl from the checkout
    try:
        assert proc.stdout.readline().strip() == "holding"
        with pytest.raises(RunDirInUse, match=f"pid {proc.pid} on"):
            RunDir(run, existing="resume")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with RunDir(run, existing="resume"):
        pass


# --------------------------------------------------------------- pruning
def _state():
    model = models.mlp([4], 3)
    return create_train_state(model, optax.adam(1e-2), jax.random.key(0), (1, 8))


def test_keep_k_never_deletes_the_checkpoint_just_written_or_newer_ones(tmp_path):
    """The audit's case: save(step=8, keep=3) with 40/50/60 present returned a deleted path."""
    state = _state()
    for s in (40, 50, 60):
        ckpt.save(tmp_path, state, step=s, keep=3)
    path = ckpt.save(tmp_path, state, step=8, keep=3)
    assert path.is_dir()
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(tmp_path)] == [8, 40, 50, 60]


@pytest.mark.slow
def test_keep_k_prunes_only_this_runs_checkpoints(tmp_path):
    state = _state()
    for s in (1, 2, 3):
        ckpt.save(tmp_path, state, step=s, extras={"run_id": "other"})
    for s in (4, 5, 6, 7):
        ckpt.save(tmp_path, state, step=s, extras={"run_id": "mine"}, keep=2)
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(tmp_path)] == [1, 2, 3, 6, 7]


@pytest.mark.slow
def test_a_live_processes_temp_folder_is_left_alone(tmp_path):
    """Two writers in one folder must not delete each other's saves in progress: the second is refused."""
    state = _state()
    writer = subprocess.Popen([sys.executable, "-c", f"""
import time, numpy as np
from fundl.train import checkpoint as ckpt
saver = ckpt.Checkpointer({str(tmp_path)!r})
saver._commit = lambda: time.sleep(60)  # a slow save, in progress
saver.save({{"w": np.ones(3, np.float32)}}, step=9)
print("saving", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "saving"
        live = tmp_path / "step_00000009.orbax-checkpoint-tmp"
        dead = tmp_path / ".step_00000008.tmp-999999999"
        dead.mkdir()
        with pytest.raises(ckpt.CheckpointError, match=f"another writer is saving checkpoints into {tmp_path}"):
            ckpt.save(tmp_path, state, step=1)
        assert live.is_dir() and dead.is_dir()
    finally:
        writer.kill()
        writer.wait()
    ckpt.save(tmp_path, state, step=1)  # its writer died: the leftovers go
    assert not live.exists() and not dead.exists()


# ------------------------------------------------------ metrics.jsonl
@pytest.mark.slow
def test_a_partial_last_metrics_line_does_not_stop_a_resume(tmp_path):
    """After a disk-full error the last line may be cut short; resume drops it with a warning."""
    experiment.run(tiny_config("training.steps=8", "training.checkpoint_every=4"), tmp_path, verbose=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"wall_time": 1.0, "step": 12, "split": "tr')
    with pytest.warns(UserWarning, match="line 4: not a JSON record .* a partial last write, dropped"):
        records = read_metrics(tmp_path)
    assert records[-1]["step"] == 8
    with pytest.warns(UserWarning, match="partial last write"):
        summary = experiment.run(tiny_config("training.steps=8", "training.checkpoint_every=4",
                                             "training.resume=true"), tmp_path, verbose=False)
    assert summary["final_step"] == 8
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # the partial line is gone, nothing else


def test_tensorboard_without_tensorboardx_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
    with pytest.raises(cfg.ConfigError, match="logging.tensorboard = true needs tensorboardX.*pip install"):
        experiment.run(tiny_config("logging.tensorboard=true"), tmp_path / "tb", verbose=False)
    assert not (tmp_path / "tb").exists()  # refused before anything was written


def test_read_metrics_keeps_unreadable_middle_lines_out_but_warns(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.warns(UserWarning, match="line 2: not a JSON record"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    with RunDir(tmp_path, existing="resume") as rd, pytest.warns(UserWarning, match="kept as it is"):
        rd.truncate_metrics(1)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\nnot json\n'
