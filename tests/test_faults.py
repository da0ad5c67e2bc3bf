"""Crashes, signals and divergence: a run killed anywhere and resumed ends bit-identical.

The subprocess tests run ``scripts/train.py`` through ``tests/fault_driver.py``,
which SIGKILLs the process at a chosen step or inside a checkpoint write (see
its docstring), and compare the final checkpoint's arrays with an
uninterrupted run's, bit for bit.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from fundl import models
from fundl.run import config as cfg
from fundl.run import experiment
from fundl.data import Loader, load_dataset
from fundl.train import checkpoint as ckpt
from fundl.train.fusion import Fusion
from fundl.train.loop import Every, NonFiniteLossError, fit
from fundl.run.rundir import RunDir, read_metrics
from fundl.train.signals import StopSignals, TrainingInterrupted
from fundl.train.state import create_train_state
from fundl.train.step import make_train_step
from test_errors import train_here  # noqa: F401 - a fixture: fundl-train's main in this process
from conftest import ROOT

# One xdist worker runs this file, so its module-scoped fixtures run once under `make test` (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_faults")

DRIVER = str(ROOT / "tests" / "fault_driver.py")
STEPS = 60
BASE = ["--config", "configs/tiny_synthetic.toml", "--quiet", "--set", "logging.plots=false",
        "--set", f"training.steps={STEPS}", "--set", "training.checkpoint_every=5",
        "--set", "training.keep_checkpoints=2", "--set", "training.eval_every=0"]
KILLED = -signal.SIGKILL


def launch(*args, fault="", slow=0.0, wait=True, timeout=120):
    env = {**os.environ, "MPLBACKEND": "Agg", "FUNDL_FAULT": fault, "FUNDL_SLOW": str(slow)}
    cmd = [sys.executable, DRIVER, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def final_arrays(run_dir) -> dict:
    return ckpt.load_arrays(Path(run_dir) / "checkpoints" / ckpt.checkpoint_name(STEPS))


def assert_bit_identical(run_dir, reference, extra_log_steps=()):
    got, want = final_arrays(run_dir), final_arrays(reference)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert got[k].tobytes() == want[k].tobytes(), f"{k} differs after resume"
    train_steps = lambda d: [r["step"] for r in read_metrics(d) if r["split"] == "train"]
    # metrics.jsonl truncated to the resumed step and re-logged (a SIGTERM also logs the step it stopped at)
    assert train_steps(run_dir) == sorted(train_steps(reference) + list(extra_log_steps))


def assert_checkpoints_intact(run_dir):
    """Every complete checkpoint verifies, and none is skipped with a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = ckpt.list_checkpoints(Path(run_dir) / "checkpoints")
        for path in found:
            ckpt.read_manifest(path, verify=True)
        if found:
            assert ckpt.latest_valid(Path(run_dir) / "checkpoints") == found[-1]
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    r = launch(*BASE, "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    return run_dir


# --------------------------------------------------------------- SIGKILL
KILL_CHAIN = ["step=3",            # before the first checkpoint: resume starts from step 0
              "save=10:write",     # while Orbax writes (in the background: training goes on)
              "save=15:rename",    # checkpoint complete in its temp folder, not yet renamed
              "save=25:renamed",   # renamed, before the old checkpoints are pruned
              "save=30:prune",     # half-way through deleting an old checkpoint (keep-K)
              "step=43",           # between checkpoints
              "save=50:write"]


@pytest.mark.slow
def test_sigkill_at_steps_and_inside_saves_resumes_bit_identically(tmp_path, reference):
    run_dir = tmp_path / "run"
    args = [*BASE, "--run-dir", str(run_dir)]
    for fault in KILL_CHAIN:
        r = launch(*args, fault=fault)
        assert r.returncode == KILLED, (fault, r.returncode, r.stderr)
        assert_checkpoints_intact(run_dir)
        args = ["--resume", str(run_dir), "--quiet"]  # later runs: the run directory's own config
    r = launch(*args)
    assert r.returncode == 0, r.stderr
    assert "skipping corrupt" not in r.stderr
    assert_bit_identical(run_dir, reference)
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".step_")]
    assert leftovers == []  # temp folders of the crashed saves were cleaned up
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000055", "step_00000060"]
    assert [p.name for p in assert_checkpoints_intact(run_dir)] == ["step_00000055", "step_00000060"]


def _kill_at_random_time(args, rng, log):
    """Start a slowed-down run, SIGKILL it a random time after its first step (once compiled)."""
    proc = launch(*args, slow=0.02, wait=False)
    t_start, seen = None, 0
    for line in proc.stderr:
        if line.startswith("fault_driver: step"):
            seen += 1
            if seen == 2:
                t_start = time.monotonic()
                break
    if t_start is None:  # nothing left to train (the last kill landed after the final checkpoint)
        proc.wait(60)
        assert proc.returncode == 0, proc.stdout.read()
        return 0
    delay = rng.uniform(0.0, 1.2)
    time.sleep(max(0.0, t_start + delay - time.monotonic()))
    proc.send_signal(signal.SIGKILL)
    rest = proc.stderr.read()
    proc.wait(60)
    steps = [int(x.split()[-1]) for x in rest.splitlines() if x.startswith("fault_driver: step")]
    if proc.returncode == KILLED:
        log.append(steps[-1] if steps else None)
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_random_times_resumes_bit_identically(tmp_path, reference, seed):
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    args = [*BASE, "--run-dir", str(run_dir)]
    killed_at = []
    for _ in range(3):
        rc = _kill_at_random_time(args, rng, killed_at)
        if rc == 0:  # finished before the kill landed
            break
        assert rc == KILLED
        assert_checkpoints_intact(run_dir)
        args = ["--resume", str(run_dir), "--quiet"]
    r = launch(*args)
    assert r.returncode == 0, r.stderr
    assert_bit_identical(run_dir, reference)
    print(f"seed {seed}: killed while dispatching steps {killed_at}")


# --------------------------------------------------------------- SIGTERM
@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_resume_completes(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = launch(*BASE, "--run-dir", str(run_dir), slow=0.05, wait=False)
    for line in proc.stderr:
        if line.startswith("fault_driver: step 17"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    msg = [x for x in err.splitlines() if "training stopped by SIGTERM" in x]
    assert msg, err
    step = int(msg[0].split("at step ")[1].split(";")[0])
    assert 17 <= step < STEPS
    assert f"saved checkpoint {run_dir / 'checkpoints' / ckpt.checkpoint_name(step)}" in err
    assert f"--resume {run_dir}" in err
    assert ckpt.latest_valid(run_dir / "checkpoints").name == ckpt.checkpoint_name(step)
    r = launch("--resume", str(run_dir), "--quiet")
    assert r.returncode == 0, r.stderr
    assert_bit_identical(run_dir, reference, extra_log_steps=[step] if step % 4 else [])


def _tiny_fit_setup(opt=None):
    ds = load_dataset("synthetic", num_train=256, num_test=64, input_shape=(8,), num_classes=3, seed=0)
    model = models.mlp([16], 3)
    opt = opt or optax.adam(1e-2)
    state = create_train_state(model, opt, jax.random.key(0), (1, 8))
    loader = Loader(ds.train, 32, seed=1, drop_last=True, prefetch=0)
    return model, opt, state, loader


@pytest.mark.slow
def test_sigint_checkpoints_at_the_next_step_and_resumes_exactly(tmp_path):
    model, opt, state, loader = _tiny_fit_setup()
    fresh = lambda: create_train_state(model, opt, jax.random.key(0), (1, 8))  # fit donates its input
    step = make_train_step(model, opt)
    full = fit(fresh(), step, loader, num_steps=20, every=Every(log=3), progress=False)

    def interrupt(record):
        if record["step"] == 9:
            os.kill(os.getpid(), signal.SIGINT)

    rd = RunDir(tmp_path)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT at step 9") as info, \
            ckpt.Checkpointer(rd.checkpoint_dir, keep=3) as saver:
        try:
            fit(fresh(), step, loader, num_steps=20, every=Every(log=3, checkpoint=4), checkpoints=saver,
                progress=False, on_log=interrupt)
        except TrainingInterrupted as stopped:  # as the run layer does: it knows how to resume
            stopped.resume_hint = "resume with: --resume X"
            raise
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    e = info.value
    assert (e.step, e.exit_code, e.signal_name) == (9, 130, "SIGINT")
    assert e.checkpoint == rd.checkpoint_dir / "step_00000009" and "resume with" in str(e)
    restored, _ = ckpt.restore(ckpt.latest_valid(rd.checkpoint_dir), fresh())
    resumed = fit(restored, step, loader, num_steps=20, every=Every(log=3), progress=False)
    for x, y in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
        x, y = (jax.random.key_data(v) if jnp_is_key(v) else v for v in (x, y))
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


@pytest.mark.slow
def test_stop_at_an_eval_resumes_exactly_with_fused_steps(tmp_path):
    """SIGTERM between fused chunks: the resumed run chunks differently, and still matches bit for bit."""
    model, opt, _, loader = _tiny_fit_setup()
    fresh = lambda: create_train_state(model, opt, jax.random.key(0), (1, 8))
    step = make_train_step(model, opt)
    kw = dict(num_steps=21, fusion=Fusion(steps_per_call=4), progress=False)
    full = fit(fresh(), step, loader, every=Every(log=8), **kw)

    def eval_fn(s):
        if int(s.step) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    rd = RunDir(tmp_path)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM at step 5") as info, \
            ckpt.Checkpointer(rd.checkpoint_dir, keep=3) as saver:
        fit(fresh(), step, loader, eval_fn=eval_fn, every=Every(log=8, eval=5), checkpoints=saver,
            on_log=rd.log, **kw)
    assert info.value.exit_code == 143
    restored, _ = ckpt.restore(ckpt.latest_valid(rd.checkpoint_dir), fresh())
    resumed = fit(restored, step, loader, every=Every(log=8), **kw)
    leaves_a = jax.tree.leaves(jax.tree.map(lambda x: x, full.state.params))
    for x, y in zip(leaves_a, jax.tree.leaves(resumed.state.params)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def jnp_is_key(x):
    return jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key)


def test_a_second_sigint_aborts_at_once():
    with StopSignals(multiprocess=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.should_stop(0) and stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)


def test_multiprocess_mode_uses_the_preemption_sync_point(monkeypatch):
    from jax.experimental import multihost_utils

    calls = []
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda i: calls.append(i) or i == 3)
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(multiprocess=True) as stop:
        assert signal.getsignal(signal.SIGTERM) is before  # SIGTERM left to JAX's preemption service
        assert [stop.should_stop(i) for i in range(4)] == [False, False, False, True]
    assert calls == [0, 1, 2, 3] and stop.received == signal.SIGTERM


# ------------------------------------------------------------- NaN guard
def _diverging(lr=1e3):
    return optax.sgd(lr, momentum=0.9)


def _first_non_finite_step(model, opt, state, loader, n=30):
    step = jax.jit(make_train_step(model, opt))
    batches = loader.stream(n)
    try:
        for i in range(n):
            state, m = step(state, next(batches))
            if not np.isfinite(float(m["loss"])):
                return i + 1
    finally:
        batches.close()
    raise AssertionError("the learning rate did not diverge")


@pytest.mark.slow
def test_nan_stop_names_the_first_bad_step_metric_and_last_good_checkpoint(tmp_path):
    model, opt, state, loader = _tiny_fit_setup(_diverging())
    first = _first_non_finite_step(model, opt, state, loader)
    rd = RunDir(tmp_path)
    with pytest.raises(NonFiniteLossError) as info, ckpt.Checkpointer(rd.checkpoint_dir, keep=3) as saver:
        fit(create_train_state(model, opt, jax.random.key(0), (1, 8)), make_train_step(model, opt), loader, num_steps=30,
            every=Every(log=20, checkpoint=2), checkpoints=saver, on_log=rd.log, progress=False, nan_policy="stop")
    e = info.value
    saved = ckpt.list_checkpoints(rd.checkpoint_dir)
    assert saved and e.checkpoint == saved[-1]
    assert str(saved[-1]) in str(e)
    if e.metric == "loss":
        assert e.step == first and f"at step {first} (metric 'loss')" in str(e)
    else:  # the state went non-finite one step before the loss did
        assert e.metric == "params" and e.step == first - 1
    for path in saved:  # no checkpoint holds a diverged state
        arrays = ckpt.load_arrays(path)
        assert all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f")


@pytest.mark.slow
def test_nan_skip_skips_updates_and_reports_the_count(tmp_path):
    config = cfg.load_config(ROOT / "configs" / "tiny_synthetic.toml", [
        "optimizer.name='sgd'", "optimizer.learning_rate=1000.0", "optimizer.momentum=0.9",
        "training.nan_policy='skip'", "training.steps=24", "logging.plots=false"])
    summary = experiment.run(config, tmp_path, verbose=False)
    assert summary["skipped_updates"] > 0
    records = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert records[-1]["skipped_updates"] == summary["skipped_updates"]
    assert json.loads((tmp_path / "summary.json").read_text())["skipped_updates"] == summary["skipped_updates"]
    arrays = ckpt.load_arrays(ckpt.latest_valid(tmp_path / "checkpoints"))
    assert all(np.isfinite(a).all() for k, a in arrays.items() if k.startswith("params/"))


@pytest.mark.slow
def test_nan_stop_through_the_cli_exits_1_naming_the_step(tmp_path, train_here):
    r = train_here("--config", "configs/tiny_synthetic.toml", "--run-dir", str(tmp_path / "run"), "--quiet",
                   "--set", "optimizer.name='sgd'", "--set", "optimizer.learning_rate=1000.0",
                   "--set", "optimizer.momentum=0.9", "--set", "training.checkpoint_every=4")
    assert r.returncode == 1
    assert "NonFiniteLossError: non-finite" in r.stderr and "at step" in r.stderr
    assert "Traceback" not in r.stderr and "nan_policy='skip'" in r.stderr


# ------------------------------------------------- multi-process SIGTERM
@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """JAX's preemption service catches SIGTERM; the sync point makes both processes save one step."""
    import test_multihost as multihost  # a test module beside this one (pytest puts tests/ on the path)

    from fundl.run import launch_local

    run_dir = tmp_path / "run"
    args = [sys.executable, DRIVER, "--config", "configs/tiny_synthetic.toml", "--quiet",
            "--set", 'parallel.mode="sharding"', "--set", "training.steps=200", "--set", "training.checkpoint_every=100",
            "--set", "logging.plots=false", "--run-dir", str(run_dir)]
    port = free_port()
    procs = [multihost.start(args, multihost.mp_env(port, i, FUNDL_SLOW="0.03")) for i in range(2)]
    try:
        for line in procs[1].stdout:
            if line.startswith("fault_driver: step 20"):
                break
        procs[1].send_signal(signal.SIGTERM)
        outs = [procs[1].stdout.read(), procs[0].communicate(timeout=120)[0]]
        procs[1].wait(120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [143, 143], outs
    stops = [x for out in outs for x in out.splitlines() if "training stopped by SIGTERM" in x]
    assert len(stops) == 2 and stops[0] == stops[1], stops  # the same step and checkpoint on both
    step = int(stops[0].split("at step ")[1].split(";")[0])
    assert 20 < step < 200
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == [ckpt.checkpoint_name(step)]
    assert f"resume with: python scripts/train.py --resume {run_dir}" in stops[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for the coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
