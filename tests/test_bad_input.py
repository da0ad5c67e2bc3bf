"""Issue 24's table, one test per row: bad input gets one clear line, never a traceback, and
nothing is lost or blocked.

Command-line rows assert the exit code (2: bad input, 1: a failure while running, 130: an
interrupt), that stderr is one ``fundl: error:`` line and at most one ``fundl: hint:`` line,
and that no traceback is printed.  The rows that only validate run in one process
(tests/cli_batch_driver.py).  The full-disk rows run on a small tmpfs, skipped where this
machine cannot mount one.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from fundl import models
from fundl.data import Loader, load_dataset
from fundl.data.checks import ExampleError
from fundl.train.loop import NonFiniteLossError, evaluate, fit
from fundl.train.optim import OptimizerError, make_optimizer
from fundl.train.state import create_train_state
from fundl.train.step import make_eval_step, make_train_step
from test_checkpoint import data_file  # the biggest array-data file of a checkpoint
from conftest import ROOT

# One xdist worker runs this file, so its module-scoped fixtures run once under `make test` (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_bad_input")

TINY = "configs/tiny_synthetic.toml"


def _env():
    env = {**os.environ, "MPLBACKEND": "Agg"}
    for name in ("FUNDL_DEBUG", "FUNDL_TRACEBACK"):
        env.pop(name, None)
    return env


def cli(*args, timeout=180):
    return subprocess.run([sys.executable, "scripts/train.py", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def assert_one_error(code, stderr, expected_code, *needles):
    """Exit ``expected_code``; stderr: one ``fundl: error:`` (or interrupt) line holding every needle, at
    most one hint line, no traceback."""
    lines = stderr.strip().splitlines()
    assert code == expected_code, (code, stderr)
    assert "Traceback" not in stderr, stderr
    assert 1 <= len(lines) <= 2 and lines[0].startswith("fundl: "), stderr
    assert len(lines) == 1 or lines[1].startswith("fundl: hint: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, stderr)


# ------------------------------------------------ rows that stop at validation or at load
ROWS = {
    "unknown dataset": (["--set", 'data.name="nosuchdata"'], ["data.name", "nosuchdata"]),
    "batch larger than the data": (["--set", "training.batch_size=1000"], ["training.batch_size=1000", "256"]),
    "too few examples for the batch": (["--set", "data.num_train=10"], ["training.batch_size=32", "10 training"]),
    "a zero-width layer": (["--set", "model.hidden=[0]"], ["model.hidden[0]", "> 0"]),
    "a negative seed": (["--set", "training.seed=-1"], ["training.seed", ">= 0"]),
    "a sweep value that is not a number": (["--sweep", "optimizer.learning_rate=abc,0.1"],
                                           ["optimizer.learning_rate", '"abc"']),
    "a negative seed in a sweep": (["--sweep", "training.seed=-1,0"], ["training.seed", "-1"]),
    "a negative learning rate in a sweep": (["--sweep", "optimizer.learning_rate=-1,0.01"],
                                            ["optimizer.learning_rate", "-1", "> 0"]),
    "a sweep member's batch larger than the data": (["--sweep", "training.batch_size=32,1000"],
                                                    ["batch_size=1000", "256 training examples"]),
}


@pytest.fixture(scope="module")
def row_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rows")
    argvs = [["--config", str(ROOT / TINY), "--run-dir", str(tmp / name.replace(" ", "_")), "--quiet", *args]
             for name, (args, _) in ROWS.items()]
    (tmp / "cases.json").write_text(json.dumps(argvs))
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_batch_driver.py"), str(tmp / "cases.json")],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, dict(zip(ROWS, json.loads(r.stdout)))


@pytest.mark.slow
@pytest.mark.parametrize("row", list(ROWS))
def test_a_bad_setting_exits_2_with_one_line(row_results, row):
    tmp, results = row_results
    assert_one_error(results[row]["code"], results[row]["stderr"], 2, "fundl: error: ", *ROWS[row][1])
    run_dir = tmp / row.replace(" ", "_")
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "config.toml").exists()  # nothing trained


def test_the_schemas_dataset_names_are_the_loaders():
    """data.name's choices are written out in the schema (validation imports no numpy): keep them equal."""
    from fundl.data.datasets import LOADERS
    from fundl.run.schema import CHOICES

    assert sorted(CHOICES["data", "name"]) == sorted(LOADERS)


# ------------------------------------------------------------ the library's data checks
@pytest.fixture(scope="module")
def tiny():
    ds = load_dataset("synthetic", num_train=64, num_test=16, input_shape=(8,), num_classes=3, seed=0)
    model, opt = models.mlp([4], 3), optax.adam(1e-2)
    state = create_train_state(model, opt, jax.random.key(0), (1, 8))
    return ds, model, state, make_train_step(model, opt)


def _fit_on(tiny, change):
    ds, _, state, step = tiny
    train = {k: v.copy() for k, v in ds.train.items()}
    change(train)
    fit(state, step, Loader(train, 16, drop_last=True, prefetch=0), num_steps=2, progress=False)


def test_a_label_of_minus_one_is_refused_before_the_first_step(tiny):
    with pytest.raises(ExampleError, match=r"the first is -1 at index 7\. Labels must be integer class ids 0\.\.2") as e:
        _fit_on(tiny, lambda t: t["y"].__setitem__(7, -1))
    assert (e.value.index, e.value.value) == (7, -1)


def test_a_label_past_the_models_classes_is_not_reported_as_divergence(tiny):
    with pytest.raises(ExampleError, match=r"outside the class range \[0, 3\); the first is 3 at index 9") as e:
        _fit_on(tiny, lambda t: t["y"].__setitem__(9, 3))
    assert not isinstance(e.value, NonFiniteLossError)


def test_a_nan_input_is_not_reported_as_divergence(tiny):
    with pytest.raises(ExampleError, match=r"non-finite inputs \('x'\); the first is example 11, which holds nan") as e:
        _fit_on(tiny, lambda t: t["x"].__setitem__((11, 2), np.nan))
    assert e.value.index == 11


@pytest.mark.slow
def test_the_classes_come_from_the_models_output(tiny):
    """A model with 5 outputs trains on labels 3 and 4 that a 3-class check would refuse."""
    ds, _, _, _ = tiny
    model, opt = models.mlp([4], 5), optax.adam(1e-2)
    state = create_train_state(model, opt, jax.random.key(0), (1, 8))
    train = {**ds.train, "y": (np.arange(64) % 5).astype(np.int32)}
    result = fit(state, make_train_step(model, opt), Loader(train, 16, drop_last=True, prefetch=0), num_steps=1,
                 progress=False)
    assert int(result.state.step) == 1


def test_evaluate_refuses_a_nan_row_instead_of_scoring_the_others(tiny):
    ds, model, state, _ = tiny
    test = {k: v.copy() for k, v in ds.test.items()}
    test["x"][3, 0] = np.nan
    with pytest.raises(ExampleError, match="evaluate: the evaluation data: 1 examples with non-finite inputs"):
        evaluate(jax.jit(make_eval_step(model)), state.params, state.model_state, test, batch_size=8)


def test_make_optimizer_names_a_learning_rate_that_is_not_a_number():
    with pytest.raises(OptimizerError, match=r"learning_rate='0\.1'\): expected a number or a schedule") as e:
        make_optimizer("adam", "0.1")
    assert e.value.argument == "learning_rate"
    make_optimizer("adam", np.float32(0.1))  # array scalars and schedules are numbers enough
    make_optimizer("adam", lambda step: 0.1)


# ------------------------------------------------------------------------- a full disk
@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size) -> path``: a tmpfs of ``size`` bytes (unmounted afterwards); skips where mounting fails."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    mounted = []

    def mount(size: int):
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): the full-disk cases need one")
        mounted.append(where)
        return where

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], capture_output=True)


@pytest.mark.slow
def test_disk_full_during_an_async_checkpoint_prints_one_error_and_no_thread_tracebacks(tmpfs):
    run = tmpfs(64 * 1024) / "run"  # too small for the first checkpoint of a 256-wide layer
    r = cli("--config", TINY, "--run-dir", str(run), "--quiet", "--set", "model.hidden=[256]",
            "--set", "logging.plots=false")
    assert_one_error(r.returncode, r.stderr, 1, "CheckpointWriteError", str(run / "checkpoints"),
                     "No space left on device", "earlier checkpoints are untouched")
    assert "Event loop is closed" not in r.stderr
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no partial copy


@pytest.mark.slow
def test_disk_full_while_config_toml_is_written_leaves_nothing_that_blocks_the_same_command(tmpfs):
    root = tmpfs(1024 * 1024)
    filler = root / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024 - 4096))  # one page left: the run directory's lock takes it
    run = root / "run"
    args = ("--config", TINY, "--run-dir", str(run), "--quiet", "--set", "logging.plots=false",
            "--set", "training.steps=12")
    r = cli(*args)
    assert_one_error(r.returncode, r.stderr, 1, f"could not write {run / 'config.toml'}", "No space left on device")
    assert "nothing of this run was kept" in r.stderr
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    filler.unlink()
    r = cli(*args)  # the same command, once there is space
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------- Ctrl-C
LOADING_JAX = "while importing JAX"


def _interrupt(args, when):
    """Start ``scripts/train.py args``; send SIGINT while it imports JAX (``LOADING_JAX``) or once
    its stdout prints a line containing ``when``; the exit code and stderr."""
    # SIGINT handled as in a terminal's process: a pytest-xdist worker may ignore it, and children inherit that
    proc = subprocess.Popen([sys.executable, "scripts/train.py", *args], cwd=ROOT, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if when == LOADING_JAX:  # the moment the process maps JAX's native library, whatever the machine's load
        maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.monotonic() + 60
        while "jaxlib" not in maps.read_text() and time.monotonic() < deadline:
            time.sleep(0.005)
    else:
        for line in proc.stdout:
            if when in line:
                break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.slow
def test_ctrl_c_during_start_up_exits_130_and_the_same_command_works(tmp_path):
    args = ("--config", TINY, "--run-dir", str(tmp_path / "run"), "--set", "logging.plots=false",
            "--set", "training.steps=12")
    code, err = _interrupt(args + ("--quiet",), LOADING_JAX)
    assert_one_error(code, err, 130, "fundl: interrupted (SIGINT)")
    # later: once the banner is out (the data loaded, the state built), while it compiles or trains
    code, err = _interrupt(args, "fundl: synthetic")
    assert code == 130 and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    again = ("--resume", str(tmp_path / "run")) if "resume with" in err else args
    r = cli(*again, "--quiet")
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ resuming a finished run
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    r = cli("--config", TINY, "--run-dir", str(run), "--quiet", "--set", "logging.plots=false")
    assert r.returncode == 0, r.stderr
    return run


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_is_one_warning_line(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    newest = run / "checkpoints" / "step_00000024"
    data = data_file(newest)
    data.write_bytes(data.read_bytes()[:100])
    r = cli("--resume", str(run), "--quiet")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "skipping corrupt checkpoint" in line]
    assert len(warnings) == 1 and warnings[0].startswith("fundl: warning: ") and str(newest) in warnings[0]
    assert "UserWarning" not in r.stderr and "warnings.warn" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("allow", [False, True])
def test_resume_refuses_a_changed_compute_dtype_even_when_allowed(finished_run, tmp_path, allow):
    """A float32 run must not continue in bfloat16: training.compute_dtype changes the numbers the
    state holds, so the resume policy classes it "structure" (refused), not "cosmetic"."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    r = cli("--resume", str(run), "--quiet", "--set", 'training.compute_dtype="bfloat16"',
            *(["--allow-change", "training.compute_dtype"] if allow else []))
    assert_one_error(r.returncode, r.stderr, 2, f"cannot resume {run}")
    assert 'training.compute_dtype: "float32" -> "bfloat16"' in r.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000012", "step_00000024"]
