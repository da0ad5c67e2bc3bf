"""Multi-process runs on 127.0.0.1: equivalence, launcher, resume, and failure behaviour.

Two processes with two fake CPU devices each form one JAX run
(``jax.distributed`` with gloo CPU collectives).  Every address is
127.0.0.1; every process started here is waited for or killed by pid.

Failures end the other process within the timeout that catches them (a killed
peer: its collective fails at once; a hung one: the heartbeat timeout; a live
one outside the collectives: the collective timeout; one that never starts:
the init timeout, via the start-up watchdog of ``fundl.run.distributed``);
the times measured are in docs/parallel.md ("When a peer fails"), the tests bound them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_parallel import KINDS, WORKER, assert_same_training, clean_env, section, shared_run

from fundl.run import distributed, launch_local
from conftest import ROOT

# One xdist worker runs this file and its siblings that share test_parallel.shared_run's reference runs
# (made once per process), so `make test` (--dist loadgroup) makes each once.
pytestmark = pytest.mark.xdist_group("parallel-reference")


TIMEOUTS = {"FUNDL_INIT_TIMEOUT": 5, "FUNDL_HEARTBEAT_TIMEOUT": 5, "FUNDL_SHUTDOWN_TIMEOUT": 5}


def mp_env(port: int, process_id: int, num_processes: int = 2, devices: int = 2, **extra) -> dict:
    return clean_env(**{"FUNDL_COORDINATOR": f"127.0.0.1:{port}", "FUNDL_NUM_PROCESSES": num_processes,
                        "FUNDL_PROCESS_ID": process_id, "FUNDL_LOCAL_DEVICES": devices, **TIMEOUTS, **extra})


def start(cmd, env, **kw):
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, **kw)


def finish(procs, timeout=240):
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


# ------------------------------------------------------------ equivalence
@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory):
    """2 processes x 2 devices (pmap; sharding with 5 fused steps per call; fsdp), and one device alone
    (test_parallel's reference run, made once per pytest process)."""
    tmp = tmp_path_factory.mktemp("mh")
    port = launch_local.free_port()
    specs = ["pmap", "sharding:0:5", "fsdp"]
    procs = [start([sys.executable, str(WORKER), str(tmp / "mp.npz"), *specs], mp_env(port, i)) for i in range(2)]
    outs = finish(procs)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert "process 1 of 2, 4 devices" in outs[1]
    return shared_run("reference", tmp_path_factory), dict(np.load(tmp / "mp.npz"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["pmap", "sharding:0:5", "fsdp"])
def test_two_processes_equal_one_device(two_by_two, mode, kind):
    one, mp = two_by_two
    other = section(mp, f"{mode}/{kind}/")
    assert int(other["num_devices"]) == 4
    if mode == "fsdp":  # each process holds a quarter of every split leaf: the state is gathered for the check
        per_device, total = other["state_bytes"]
        assert per_device / total < 0.3, (per_device, total)
    assert_same_training(section(one, f"none/{kind}/"), other, f"{mode} 2 processes x 2 devices, {kind}")


# ------------------------------------------------ launcher, writing, resume
def launch_train(tmp_path, capsys, *args, mode="sharding"):
    argv = ["-n", "2", "--local-devices", "2", "--init-timeout", "20", "--heartbeat-timeout", "10", "--",
            "--config", str(ROOT / "configs" / "tiny_synthetic.toml"), "--quiet",
            "--set", f'parallel.mode="{mode}"', "--set", "logging.plots=false", "--run-dir", str(tmp_path / "run"), *args]
    old, env = os.environ.copy(), clean_env()  # this environment less fundl's and launchers' variables
    os.environ.clear()
    os.environ.update(env)
    try:
        code = launch_local.main(argv)
    finally:
        os.environ.clear()
        os.environ.update(old)
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.slow
def test_launcher_trains_writes_once_and_resumes(tmp_path, capsys):
    """2 processes x 2 devices from scripts/launch_local.py: sharding, then resumed with pmap."""
    code, out = launch_train(tmp_path, capsys, "--set", "training.steps_per_call=4")
    assert code == 0, out[-4000:]
    assert "[p0] test accuracy" in out and "[p1] test accuracy" in out
    assert "process 0 finished (exit 0)" in out and "process 1 finished (exit 0)" in out
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 4 and summary["final_step"] == 24
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert steps == sorted(set(steps)) == [4, 8, 12, 16, 20, 24]  # one writer: no duplicated lines
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000012", "step_00000024"]
    assert not list((run / "checkpoints").glob(".*tmp*"))

    # resume the sharding run's checkpoint under pmap: checkpoints are plain states
    code, out = launch_train(tmp_path, capsys, "--resume", "--set", "training.steps=36",
                             "--allow-change", "training.steps", mode="pmap")
    assert code == 0, out[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_step"] == 36 and summary["processes"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [4, 8, 12, 16, 20, 24, 28, 32, 36]
    assert (run / "checkpoints" / "step_00000036").is_dir()


@pytest.mark.slow
def test_a_process_that_cannot_see_the_checkpoint_stops_every_process(tmp_path):
    """Resume needs every process to find the same checkpoint: here process 1's run directory
    is empty (as on a disk that is not shared), so both stop with one clear error instead of
    process 1 silently starting from step 0."""
    from fundl.run import config as cfg
    from fundl.run import experiment

    seen = tmp_path / "shared"  # a finished single-process run (trained here: the processes below resume it)
    config = cfg.load_config(ROOT / "configs" / "tiny_synthetic.toml", ["logging.plots=false"])
    assert experiment.run(config, seen, verbose=False)["final_step"] == 24
    port = launch_local.free_port()
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny_synthetic.toml"),
           "--quiet", "--set", 'parallel.mode="sharding"', "--set", "logging.plots=false", "--resume"]
    procs = [start(cmd + ["--run-dir", str(seen if i == 0 else tmp_path / "unseen")], mp_env(port, i, devices=1))
             for i in range(2)]
    outs = finish(procs)
    for p, out in zip(procs, outs):
        assert p.returncode == 1, out[-3000:]
        assert "do not see the same checkpoints (process 0: step 24, process 1: no checkpoint)" in out, out[-3000:]
        assert "Traceback" not in out
    assert not (tmp_path / "unseen").exists()


# --------------------------------------------------------------- failures
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny_synthetic.toml"),
         "--quiet", "--set", 'parallel.mode="sharding"', "--set", "training.steps=1000000",
         "--set", "training.log_every=10", "--set", "training.checkpoint_every=0", "--set", "training.eval_every=0"]


def _wait_training(run_dir: Path, procs, limit=120.0):
    t0 = time.monotonic()
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and metrics.stat().st_size > 0):
        assert all(p.poll() is None for p in procs), "a process ended before training started"
        assert time.monotonic() - t0 < limit, "training did not start"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "hang"])
def test_dead_or_hung_peer_stops_the_others_within_bound(tmp_path, how):
    """SIGKILL: the survivor's collective fails at once and it exits 1 with a clear line.
    SIGSTOP: the runtime misses heartbeats for heartbeat_timeout (5 s) and aborts the survivor."""
    port = launch_local.free_port()
    run_dir = tmp_path / "run"
    procs = [start(TRAIN + ["--run-dir", str(run_dir)], mp_env(port, i, devices=1)) for i in range(2)]
    try:
        _wait_training(run_dir, procs)
        procs[1].send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()
        out, _ = procs[0].communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"{how}: survivor exited with {procs[0].returncode} after {elapsed:.2f} s")
    bound = 5 + 10  # heartbeat timeout + slack for a loaded 2-core machine
    assert elapsed < bound, f"survivor took {elapsed:.1f} s (> {bound} s)"
    assert procs[0].returncode != 0
    if procs[0].returncode == 1:
        assert "fundl: process 0 of 2: a peer process failed, disconnected or stopped responding" in out, out[-3000:]
    else:  # the runtime's own abort (heartbeat timeout)
        assert procs[0].returncode == -signal.SIGABRT, out[-3000:]
        assert "JAX distributed service detected fatal errors" in out, out[-3000:]
    if how == "kill":
        assert procs[0].returncode == 1, out[-3000:]


STUCK = """
import os, sys, time
from fundl.run import distributed
distributed.initialize(distributed.settings_from())
import jax, numpy as np
f = jax.pmap(lambda a: jax.lax.psum(a, "i"), axis_name="i")
f(np.ones((1, 3), np.float32)).block_until_ready()
print("joined", flush=True)
if jax.process_index() == 1:
    time.sleep(120)  # alive (heartbeats go on) but never joins the next collective
f(np.ones((1, 3), np.float32)).block_until_ready()
"""


@pytest.mark.slow
def test_stuck_peer_fails_the_collective_after_collective_timeout():
    """A live peer that stops taking part: heartbeats continue, the collective timeout ends it."""
    port = launch_local.free_port()
    code = STUCK  # run with cwd=ROOT: fundl from the checkout
    env = lambda i: mp_env(port, i, devices=1, FUNDL_COLLECTIVE_TIMEOUT=5, FUNDL_HEARTBEAT_TIMEOUT=60)
    procs = [start([sys.executable, "-c", code], env(i)) for i in range(2)]
    try:
        for line in procs[0].stdout:
            if line.startswith("joined"):
                break
        t0 = time.monotonic()
        out, _ = procs[0].communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    print(f"stuck: process 0 exited with {procs[0].returncode} after {elapsed:.2f} s")
    assert procs[0].returncode == 1, out[-3000:]
    assert "stopped responding during a collective" in out and "Timed out waiting 5000ms" in out, out[-3000:]
    assert elapsed < 5 + 10


@pytest.mark.slow
def test_peer_that_never_starts_stops_process_zero_within_init_timeout(tmp_path):
    port = launch_local.free_port()
    proc = start(TRAIN + ["--run-dir", str(tmp_path / "run")], mp_env(port, 0, devices=1))
    t0 = time.monotonic()
    out = finish([proc], timeout=60)[0]
    elapsed = time.monotonic() - t0
    print(f"never started: process 0 exited with {proc.returncode} after {elapsed:.2f} s")
    assert proc.returncode == 1, out[-3000:]
    assert "not all processes joined the run at 127.0.0.1" in out and "init_timeout=5 s" in out
    assert elapsed < 5 + 10


@pytest.mark.slow
def test_launcher_reports_a_missing_peer(tmp_path, capsys):
    code = launch_local.launch(2, ["--config", str(ROOT / "configs" / "tiny_synthetic.toml"), "--quiet",
                                   "--set", 'parallel.mode="sharding"', "--run-dir", str(tmp_path / "run")],
                               init_timeout=3, heartbeat_timeout=5, env=clean_env(), only=[1])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 1
    assert "[p1] fundl: process 1 of 2: not all processes joined" in text
    assert "launch_local: process 1 failed (exit 1)" in text


# ------------------------------------------------------------- settings
def test_settings_from_flags_and_environment():
    s = distributed.settings_from(None, {})
    assert not s.multi_process and s.num_processes == 1
    env = {"FUNDL_COORDINATOR": "127.0.0.1:1234", "FUNDL_NUM_PROCESSES": "3", "FUNDL_PROCESS_ID": "2",
           "FUNDL_HEARTBEAT_TIMEOUT": "7"}
    s = distributed.settings_from(None, env)
    assert (s.coordinator, s.num_processes, s.process_id, s.heartbeat_timeout) == ("127.0.0.1:1234", 3, 2, 7)
    p = argparse.ArgumentParser()
    distributed.add_arguments(p)
    s = distributed.settings_from(p.parse_args(["--process-id", "1", "--init-timeout", "9"]), env)
    assert (s.process_id, s.init_timeout, s.num_processes) == (1, 9, 3)  # flags win over the environment


@pytest.mark.parametrize("env,match", [
    ({"FUNDL_NUM_PROCESSES": "2"}, "need a coordinator"),
    ({"FUNDL_COORDINATOR": "127.0.0.1"}, "HOST:PORT"),
    ({"FUNDL_COORDINATOR": "127.0.0.1:5", "FUNDL_NUM_PROCESSES": "2", "FUNDL_PROCESS_ID": "2"}, "process_id"),
    ({"FUNDL_COORDINATOR": "127.0.0.1:5", "FUNDL_HEARTBEAT_TIMEOUT": "0"}, "heartbeat_timeout"),
    ({"FUNDL_PROCESS_ID": "x"}, "must be an integer"),
])
def test_settings_errors(env, match):
    with pytest.raises(distributed.DistributedError, match=match):
        distributed.settings_from(None, env)
