"""Checkpoints (fundl.train.checkpoint): content, async saves, atomic saves and keep-K, write errors,
crashes, corruption, older formats, shardings, and checkpoints under fit and the CLI.

Format 2 is an Orbax ``state/`` folder written by Orbax's CheckpointManager
plus fundl's manifest; formats written before (format 1, and format 2 from
before the manager) are fixtures under tests/data.
"""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fundl import models
from fundl.data import Loader, load_dataset
from fundl.train import checkpoint as ckpt
from fundl.train.checkpoint import manifest as manifest_lib
from fundl.train.checkpoint import orbax_manager
from fundl.train.checkpoint.saver import Checkpointer
from fundl.run.rundir import RunDir
from fundl.train.loop import Every, fit
from fundl.train.signals import TrainingInterrupted
from fundl.train.state import create_train_state, is_prng_key
from fundl.train.step import make_train_step
from conftest import ROOT

# One xdist worker runs this file, so its module-scoped fixtures run once under `make test` (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_checkpoint")

FORMAT1 = ROOT / "tests" / "data" / "checkpoint_format1"  # written by fundl's format-1 save (commit 344f934)
FORMAT2 = ROOT / "tests" / "data" / "checkpoint_format2"  # format 2 before Orbax's manager (commit 4d9dde7)
TMP = ".orbax-checkpoint-tmp"  # the suffix of Orbax's temporary folder of a save in flight


# ---------------------------------------------------------------- helpers
def make_state(opt=None, hidden=(16,)):
    model = models.mlp(list(hidden), 3)
    opt = opt or optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    return create_train_state(model, opt, jax.random.key(0), (1, 8))


def cnn_state(steps=3):
    """A real TrainState: conv + batch norm (model_state), Adam (opt_state), a typed key; trained a little."""
    model = models.cnn([2], [], 3, batch_norm=True)
    opt = optax.adam(1e-2)
    state = create_train_state(model, opt, jax.random.key(0), (1, 6, 6, 1))
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(4, 6, 6, 1)).astype(np.float32), "y": np.array([0, 1, 2, 1], np.int32)}
    step = jax.jit(make_train_step(model, opt))
    for _ in range(steps):
        state, _ = step(state, batch)
    return state


def bump(state, k):
    """A different state of the same structure (as after k more steps)."""
    return jax.tree.map(lambda x: x if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x + k, state)


def host(x):
    return np.asarray(jax.random.key_data(x) if is_prng_key(x) else x)


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()


def assert_bit_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert is_prng_key(x) == is_prng_key(y)
        if is_prng_key(x):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
        x, y = host(x), host(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def data_file(path):
    """The biggest file under ``path/state/``: array data of the OCDBT store (not metadata)."""
    files = [f for f in (path / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    return max(files, key=lambda f: f.stat().st_size)


def state_bytes(path):
    """Every file of checkpoint ``path`` (state/ and the manifest), for checks that nothing changed."""
    return {f.relative_to(path).as_posix(): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def not_checkpoints(directory):
    """What else ``directory`` holds: temporary folders of saves, trash, set-aside copies."""
    keep = {p.name for p in ckpt.list_checkpoints(directory)}
    return sorted(p.name for p in Path(directory).iterdir() if p.name not in keep)


def save_steps(directory, steps=(1, 2, 3), keep=None):
    state = make_state()
    return [ckpt.save(directory, bump(state, s), step=s, extras={"loader": {"epoch": 0, "index": s}},
                      keep=keep) for s in steps], state


def _run(code, timeout=120, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **env})


# ---------------------------------------------------------------- content
@pytest.mark.slow
def test_round_trip_is_exact_with_typed_keys_optax_state_and_extras(tmp_path):
    state = bump(make_state(), 7)
    path = ckpt.save(tmp_path, state, step=7, extras={"loader": {"epoch": 1, "index": 3}, "config_hash": "abc"})
    restored, manifest = ckpt.restore(path, make_state())
    leaves_equal(state, restored)
    assert type(restored.opt_state) is type(state.opt_state)  # optax NamedTuples rebuilt from the template
    assert manifest["step"] == 7 and manifest["extras"] == {"loader": {"epoch": 1, "index": 3}, "config_hash": "abc"}
    assert not (tmp_path / "latest").exists()  # no pointer file: the newest valid step_* folder is the one
    # the manifest lists every leaf by tree path: params, optimiser state, key
    assert {"step", "params/dense_0/w", "key"} <= set(manifest["leaves"])
    assert any(p.startswith("opt_state/") for p in manifest["leaves"])


@pytest.mark.slow
def test_round_trip_is_bit_exact_and_state_is_a_plain_orbax_checkpoint(tmp_path):
    state = cnn_state()
    with ckpt.Checkpointer(tmp_path) as saver:
        path = saver.save(state, step=3, extras={"loader": {"epoch": 0, "index": 3}})
        assert saver.wait() == path
    # fundl's manifest and Orbax's state/, beside the two step files Orbax's CheckpointManager writes
    assert sorted(p.name for p in path.iterdir()) == ["_CHECKPOINT_METADATA", "commit_success.txt",
                                                      "manifest.json", "state"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == 2 and manifest["step"] == 3
    assert manifest["extras"] == {"loader": {"epoch": 0, "index": 3}}
    files = {f.relative_to(path).as_posix() for f in (path / "state").rglob("*") if f.is_file()}
    assert set(manifest["files"]) == files  # a sha256 of every file under state/
    assert manifest["leaves"]["key"] == {"shape": [2], "dtype": "uint32"}  # typed keys stored as key data
    assert manifest["leaves"]["model_state/batch_norm_0/var"]["dtype"] == "float32"

    restored, _ = ckpt.restore(path, cnn_state(steps=0))  # any state of the same structure
    assert_bit_equal(restored, state)
    assert type(restored.opt_state[0]) is type(state.opt_state[0])  # Optax classes from the template

    # state/ is Orbax's own format: a plain Orbax call reads it (a nested dict by tree path)
    import orbax.checkpoint as ocp
    plain = ocp.StandardCheckpointer().restore(path / "state")
    assert np.asarray(plain["params"]["conv2d_0"]["w"]).tobytes() == host(state.params["conv2d_0"]["w"]).tobytes()
    assert np.asarray(plain["key"]).tobytes() == host(state.key).tobytes()


def test_constant_extras_are_stored_under_each_saves_extras(tmp_path):
    """The constructor's extras (what the run layer passes: the config, the run id) are in every
    manifest; a save's own extras (the loader position) add to them and win on a clash."""
    state = cnn_state(steps=0)
    with ckpt.Checkpointer(tmp_path, keep=0, extras={"run_id": "r", "config": {"lr": 0.1}, "note": "a"}) as saver:
        first = saver.save(state, step=1, extras={"loader": {"index": 1}})
        second = saver.save(state, step=2, extras={"loader": {"index": 2}, "note": "b"})
    assert ckpt.read_manifest(first)["extras"] == {"run_id": "r", "config": {"lr": 0.1}, "note": "a",
                                                   "loader": {"index": 1}}
    assert ckpt.read_manifest(second)["extras"] == {"run_id": "r", "config": {"lr": 0.1}, "note": "b",
                                                    "loader": {"index": 2}}
    with pytest.raises(TypeError):
        ckpt.Checkpointer(tmp_path, extras={"bad": object()})  # not JSON: refused at once


@pytest.mark.slow
def test_restore_into_a_different_structure_lists_the_mismatching_paths(tmp_path):
    path = ckpt.save(tmp_path, make_state(), step=1)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.restore(path, make_state(hidden=(32,)))
    msg = str(info.value)
    assert str(path) in msg and "params/dense_0/w: expected ((8, 32), 'float32'), checkpoint has ((8, 16), 'float32')" in msg
    with pytest.raises(ckpt.CheckpointError, match="missing from the checkpoint|not in the model's state"):
        ckpt.restore(path, make_state(opt=optax.sgd(0.1, momentum=0.9)))


def test_relative_directories_work(tmp_path, monkeypatch):
    """Run directories are often relative (``make train``: runs/NAME); Orbax itself takes only
    absolute paths.  Bug: every save into a relative directory failed ("Checkpoint path should be
    absolute")."""
    monkeypatch.chdir(tmp_path)
    state = cnn_state()
    with ckpt.Checkpointer(Path("runs/x/checkpoints"), keep=2) as saver:
        saver.save(state, step=3)
    path = ckpt.latest_valid("runs/x/checkpoints")
    assert path == Path("runs/x/checkpoints/step_00000003")
    assert_bit_equal(ckpt.restore(path, state)[0], state)
    assert ckpt.load_arrays(path).keys() == ckpt.flatten_state(state).keys()


# ------------------------------------------------------------ async saves
def test_async_save_equals_sync_save_bit_for_bit(tmp_path):
    state = cnn_state()
    sync = ckpt.save(tmp_path / "sync", state, step=3)
    with ckpt.Checkpointer(tmp_path / "async") as saver:
        saver.save(state, step=3)
    a, b = ckpt.load_arrays(sync), ckpt.load_arrays(tmp_path / "async" / "step_00000003")
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() and a[k].dtype == b[k].dtype for k in a)


def test_training_continues_while_saving_and_donation_does_not_touch_the_checkpoint(tmp_path, monkeypatch):
    """save() returns before the checkpoint is committed; donating steps then overwrite the very
    buffers that were saved; the checkpoint still holds the values at save time."""
    state = {"step": jnp.int32(5), "w": jax.random.normal(jax.random.key(1), (2048, 2048)),
             "v": jnp.arange(1000.0), "key": jax.random.key(7)}
    at_save = jax.tree.map(lambda x: host(x).copy(), state)
    release = threading.Event()
    real = Checkpointer._commit  # runs in Orbax's background once its write is done
    monkeypatch.setattr(Checkpointer, "_commit", lambda self: (release.wait(60), real(self)))
    update = jax.jit(lambda t: {**t, "step": t["step"] + 1, "w": t["w"] * 2 + 1, "v": t["v"] - 3}, donate_argnums=0)
    with ckpt.Checkpointer(tmp_path) as saver:
        path = saver.save(state, step=5)
        for _ in range(10):  # training goes on while the save is pending, donating the saved buffers
            state = update(state)
        jax.block_until_ready(state)
        assert saver.pending == path and not path.exists()  # not committed while training went on
        release.set()
        assert saver.wait() == path and path.is_dir()
    restored, _ = ckpt.restore(path, jax.tree.map(lambda x: x, at_save) | {"key": jax.random.key(0)})
    for k in ("step", "w", "v", "key"):
        assert host(restored[k]).tobytes() == at_save[k].tobytes(), k
    assert host(state["w"]).tobytes() != at_save["w"].tobytes()  # the live state did change


def test_wait_with_a_timeout_leaves_a_slow_save_pending(tmp_path, monkeypatch):
    release = threading.Event()
    real = Checkpointer._commit
    monkeypatch.setattr(Checkpointer, "_commit", lambda self: (release.wait(60), real(self)))
    with ckpt.Checkpointer(tmp_path) as saver:
        first = saver.save(cnn_state(steps=0), step=1)
        assert saver.wait(timeout=0.2) is None and saver.pending == first  # gave up: still pending
        release.set()
        assert saver.wait(timeout=60) == first and saver.pending is None
    assert ckpt.latest_valid(tmp_path) == first
    # close(timeout) abandons a save still pending (an error is on its way out); Orbax may still commit it
    release.clear()
    saver = ckpt.Checkpointer(tmp_path)
    second = saver.save(cnn_state(steps=0), step=2)
    assert saver.close(timeout=0.2) is None  # nothing committed by this checkpointer yet
    assert saver.pending == second and not second.exists()
    release.set()
    deadline = time.monotonic() + 60
    while not second.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ckpt.read_manifest(second)["step"] == 2


def test_orbax_never_calls_jaxs_preemption_sync_point(tmp_path, monkeypatch):
    """fundl's stop signals own JAX's preemption sync point (their counter); Orbax's manager would
    call it with checkpoint steps, which moves the step every process agrees to stop at."""
    from jax.experimental import multihost_utils

    calls = []
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda i: calls.append(i) or False)
    with ckpt.Checkpointer(tmp_path, keep=1) as saver:
        for s in (1, 2):
            saver.save(cnn_state(steps=0), step=s)
    assert calls == [] and [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002"]


def test_no_logging_filter_outlives_a_save(tmp_path, monkeypatch):
    """Orbax's duplicate error logs are filtered only while a save is in flight: no global state stays."""
    absl = logging.getLogger("absl")
    before = list(absl.filters)
    with ckpt.Checkpointer(tmp_path) as saver:
        saver.save(cnn_state(steps=0), step=1)
        assert len(absl.filters) == len(before) + 1  # pending
        saver.wait()
        assert absl.filters == before
    monkeypatch.setattr(Checkpointer, "_commit", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError), ckpt.Checkpointer(tmp_path) as saver:
        saver.save(cnn_state(steps=0), step=2)
    assert absl.filters == before


# ------------------------------------------------------- atomic, keep-K
def test_keep_k_keeps_the_newest(tmp_path):
    save_steps(tmp_path, steps=(1, 2, 3, 4, 5), keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert not_checkpoints(tmp_path) == []


def test_keep_k_with_async_saves(tmp_path):
    state = cnn_state(steps=0)
    with ckpt.Checkpointer(tmp_path, keep=2) as saver:
        for s in range(1, 6):
            saver.save(state, step=s, extras={"run_id": "r"})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_pruning_happens_after_the_new_checkpoint_is_committed(tmp_path, monkeypatch):
    """fundl's manifest is written before Orbax renames the new checkpoint into place, and Orbax
    prunes only after that: at no moment is there no valid checkpoint."""
    paths, state = save_steps(tmp_path, steps=(1, 2))
    seen = []
    real = Checkpointer._commit

    def commit(self):
        seen.append([p.name for p in ckpt.list_checkpoints(tmp_path)])  # before the rename
        real(self)
        temporary = orbax_manager.temporary_folder(self.pending)
        seen.append(sorted(p.name for p in temporary.iterdir()))  # the manifest, still inside

    monkeypatch.setattr(Checkpointer, "_commit", commit)
    new = ckpt.save(tmp_path, bump(state, 3), step=3, keep=1)
    assert seen[0] == ["step_00000001", "step_00000002"]  # nothing pruned before the commit
    assert "manifest.json" in seen[1] and "state" in seen[1]
    assert ckpt.list_checkpoints(tmp_path) == [new] and ckpt.latest_valid(tmp_path) == new


@pytest.mark.parametrize("where", ["orbax_save", "background_write", "commit"])
def test_an_exception_inside_a_save_leaves_earlier_checkpoints_intact(tmp_path, monkeypatch, where):
    """An error in Orbax's blocking part, after its background write (before fundl's commit), or in
    fundl's commit (the manifest)."""
    paths, state = save_steps(tmp_path, steps=(1, 2))
    before = {p: state_bytes(p) for p in paths}

    def boom(*a, **k):
        raise RuntimeError(f"injected failure in {where}")

    if where == "orbax_save":
        import orbax.checkpoint as ocp
        monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", boom)
    elif where == "background_write":
        monkeypatch.setattr(Checkpointer, "_commit", boom)
    else:
        monkeypatch.setattr(manifest_lib, "write_json_atomic", boom)
    with pytest.raises(RuntimeError, match="injected"):
        ckpt.save(tmp_path, bump(state, 3), step=3, keep=1)
    assert ckpt.list_checkpoints(tmp_path) == paths  # nothing pruned, nothing half-written
    assert {p: state_bytes(p) for p in paths} == before
    assert not_checkpoints(tmp_path) == []  # temporary folder removed


def test_a_failed_save_does_not_fail_the_next_one(tmp_path, monkeypatch):
    """Bug: after Orbax's save failed, fundl removed the temporary folder while Orbax's background
    part of that save (its metadata writes) was still running; its FileNotFoundError then surfaced
    in the *next*, unrelated save (the module-level save shared one Orbax checkpointer).  It was a
    race, so the check repeats; a failed save now waits for Orbax and drops that manager."""
    import orbax.checkpoint as ocp

    state = make_state()
    real = ocp.StandardCheckpointHandler.async_save

    def scheduled_then_failed(self, *a, **k):  # Orbax's metadata writes are already under way ...
        raise RuntimeError("injected failure in Orbax's save")

    for i in range(5):
        monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", scheduled_then_failed)
        with pytest.raises(RuntimeError, match="injected"):
            ckpt.save(tmp_path / f"bad{i}", state, step=1)
        monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", real)
        path = ckpt.save(tmp_path / f"good{i}", state, step=1)  # ... and must not fail this one
        leaves_equal(ckpt.restore(path, state)[0], state)
    # Writes TensorStore had already started may land after the failed save removed its folder: a
    # leftover that readers ignore and the next save into that directory removes.
    for i in range(5):
        ckpt.save(tmp_path / f"bad{i}", state, step=2)
        assert sorted(p.name for p in (tmp_path / f"bad{i}").iterdir()) == ["step_00000002"]


def test_a_failed_save_of_a_checkpointer_does_not_fail_its_next_save(tmp_path, monkeypatch):
    state = cnn_state(steps=0)
    real = Checkpointer._commit
    with ckpt.Checkpointer(tmp_path, keep=2) as saver:
        saver.save(state, step=1)
        saver.wait()
        monkeypatch.setattr(Checkpointer, "_commit", lambda self: 1 / 0)
        saver.save(state, step=2)
        with pytest.raises(ZeroDivisionError):
            saver.wait()
        monkeypatch.setattr(Checkpointer, "_commit", real)
        for s in (3, 4):
            saver.save(state, step=s)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert not_checkpoints(tmp_path) == []


def test_a_second_writer_into_the_same_folder_is_refused_until_the_first_closes(tmp_path):
    """Orbax's manager removes every temporary folder when it starts: a second writer must not start
    while the first may have a save in progress (tests/test_rundir.py: the same across processes)."""
    state = cnn_state(steps=0)
    first = ckpt.Checkpointer(tmp_path)
    first.save(state, step=1)
    with pytest.raises(ckpt.CheckpointError, match=f"another writer is saving checkpoints into {tmp_path}"):
        ckpt.save(tmp_path, state, step=2)
    assert first.wait() == tmp_path / "step_00000001"  # undisturbed
    first.close()
    ckpt.save(tmp_path, state, step=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]


def test_resaving_a_step_replaces_it(tmp_path):
    paths, state = save_steps(tmp_path, steps=(1,))
    ckpt.save(tmp_path, bump(state, 5), step=1)
    leaves_equal(ckpt.restore(paths[0], state)[0], bump(state, 5))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert not_checkpoints(tmp_path) == []


def test_a_failed_resave_keeps_the_earlier_copy(tmp_path, monkeypatch):
    paths, state = save_steps(tmp_path, steps=(1, 2))
    before = state_bytes(paths[1])
    monkeypatch.setattr(Checkpointer, "_commit", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        ckpt.save(tmp_path, bump(state, 5), step=2)
    assert ckpt.list_checkpoints(tmp_path) == paths and state_bytes(paths[1]) == before
    assert not_checkpoints(tmp_path) == []


# ------------------------------------------------------------ write errors
def test_disk_full_during_a_save_is_a_clear_error_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    paths, state = save_steps(tmp_path, steps=(1, 2))
    real_commit = Checkpointer._commit

    def full_disk(self):  # Orbax's files are there; then report what TensorStore reports on a full disk
        raise ValueError('DATA_LOSS: Error writing "params/dense_0/w/0.0" in OCDBT database: Failed to write '
                         '4096 bytes to file 11: No space left on device [os_error_code=\'28\']')

    monkeypatch.setattr(Checkpointer, "_commit", full_disk)
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        ckpt.save(tmp_path, bump(state, 3), step=3, keep=1)
    e = info.value
    assert e.errno == errno.ENOSPC and isinstance(e, OSError)
    msg = str(e)
    assert str(tmp_path / "step_00000003") in msg and "No space left on device" in msg
    assert f"the newest intact checkpoint is {paths[-1]}" in msg and "Free some disk space" in msg
    assert not_checkpoints(tmp_path) == []
    monkeypatch.setattr(Checkpointer, "_commit", real_commit)
    assert ckpt.latest_valid(tmp_path) == paths[-1]
    leaves_equal(ckpt.restore(paths[-1], state)[0], bump(state, 2))


def _orphaned_task_logs(filename, caplog) -> list[str]:
    """What asyncio logs when the garbage collector meets a failed task nobody awaited, its
    coroutine defined in ``filename`` (as Orbax's write tasks are, when one fragment of a save fails)."""
    import asyncio
    import gc

    namespace = {}
    exec(compile("async def write_fragment():\n    raise ValueError('No space left on device')\n",
                 filename, "exec"), namespace)
    loop = asyncio.new_event_loop()
    task = loop.create_task(namespace["write_fragment"]())
    loop.run_until_complete(asyncio.sleep(0))  # the task runs and fails; nobody retrieves its error
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        del task
        loop.close()
        gc.collect()
    return [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]


def test_a_failed_save_silences_asyncio_logs_of_its_orphaned_orbax_tasks_only(tmp_path, monkeypatch, caplog):
    """CI once printed such a log, with a traceback, after the command's one-line error (issue 24)."""
    def full_disk(self):
        raise ValueError("No space left on device [os_error_code='28']")

    monkeypatch.setattr(Checkpointer, "_commit", full_disk)
    with pytest.raises(ckpt.CheckpointWriteError):
        ckpt.save(tmp_path, {"step": np.int32(1), "w": np.ones(3, np.float32)}, step=1)
    assert _orphaned_task_logs("/site-packages/orbax/checkpoint/_src/serialization/serialization.py", caplog) == []
    assert len(_orphaned_task_logs(str(tmp_path / "user_code.py"), caplog)) == 1  # other tasks still log


@pytest.mark.slow
def test_a_real_write_error_from_tensorstore_is_a_checkpoint_write_error(tmp_path):
    """The file size limit (RLIMIT_FSIZE) makes the kernel fail Orbax's write with EFBIG, as a
    full disk fails it with ENOSPC: the error reaches wait() with its errno and a clear message."""
    code = f"""
import errno, resource, signal, numpy as np
from fundl.train import checkpoint as ckpt
d = {str(tmp_path)!r}
good = ckpt.save(d, {{"step": np.int32(1), "w": np.ones(3, np.float32)}}, step=1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
w = np.random.default_rng(0).normal(size=(1024, 1024)).astype(np.float32)
with ckpt.Checkpointer(d) as saver:
    saver.save({{"step": np.int32(2), "w": w}}, step=2)
    try:
        saver.wait()
    except ckpt.CheckpointWriteError as e:
        assert e.errno == errno.EFBIG, e.errno
        print("MESSAGE", e)
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr
    msg = r.stdout.split("MESSAGE ", 1)[1]
    assert f"could not write checkpoint {tmp_path / 'step_00000002'}: File too large" in msg
    assert f"the newest intact checkpoint is {tmp_path / 'step_00000001'}" in msg
    assert "Traceback" not in r.stderr  # Orbax's own error logs are not repeated
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]


# --------------------------------------------------------------- crashes
def test_a_crashed_save_leaves_only_a_temp_folder_that_the_next_save_removes(tmp_path):
    paths, state = save_steps(tmp_path, steps=(1,))
    stale = tmp_path / f"step_00000002{TMP}"  # what a SIGKILL mid-write leaves (Orbax's temporary folder)
    (stale / "state" / "ocdbt.process_0" / "d").mkdir(parents=True)
    (stale / "state" / "ocdbt.process_0" / "d" / "half").write_bytes(b"\x00 half")
    trash = tmp_path / orbax_manager.TRASH / "step_00000000"  # a keep-K deletion cut short
    (trash / "state").mkdir(parents=True)
    old_tmp = tmp_path / ".step_00000002.tmp-99999"  # the same, left by fundl before Orbax's manager
    (old_tmp / "state").mkdir(parents=True)
    old_trash = tmp_path / ".step_00000000.del-99999"
    old_trash.mkdir()
    assert ckpt.list_checkpoints(tmp_path) == paths and ckpt.latest_valid(tmp_path) == paths[0]
    ckpt.save(tmp_path, bump(state, 2), step=2)
    assert not stale.exists() and not trash.exists() and not old_tmp.exists() and not old_trash.exists()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]
    assert not_checkpoints(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("when", ["write", "commit", "resave"])
def test_sigkill_while_saving_never_damages_earlier_checkpoints(tmp_path, when):
    """A real SIGKILL in a child process while Orbax writes a 64 MB state, half-way through
    fundl's commit (some files hashed and fsynced, no manifest yet), or while saving step 2
    again (its earlier copy set aside until the new one is committed).  The kills inside the
    commit come at the third file hashed (of nine, whatever the size): those states are small."""
    paths, _ = save_steps(tmp_path, steps=(1, 2))
    before = {p: state_bytes(p) for p in paths}
    step = 2 if when == "resave" else 3
    side = 4000 if when == "write" else 256
    code = f"""
import os, signal, threading, time, numpy as np
from fundl.train import checkpoint as ckpt
from fundl.train.checkpoint import manifest
from fundl.train.checkpoint.saver import Checkpointer
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if {when!r} == "write":
    real = Checkpointer.wait
    def wait(self, timeout=None):
        if self.pending is not None:
            threading.Timer(0.02, die).start()  # Orbax's threads are writing
            real(self, timeout)
            time.sleep(10)
        return real(self, timeout)
    Checkpointer.wait = wait
else:
    real_sha, seen = manifest.file_sha256, []
    def sha(path, **kw):
        seen.append(path)
        if len(seen) == 3:
            die()
        return real_sha(path, **kw)
    manifest.file_sha256 = sha
w = np.random.default_rng(0).normal(size=({side}, {side})).astype(np.float32)
ckpt.save({str(tmp_path)!r}, {{"step": np.int32({step}), "w": w}}, step={step}, keep=1)
"""
    r = _run(code)
    assert r.returncode == -9, r.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f"step_0000000{step}{TMP}")]  # left behind ...
    if when == "resave":  # step 2 waits as .step_00000002.old: not a checkpoint until put back
        assert ckpt.list_checkpoints(tmp_path) == paths[:1] and (tmp_path / ".step_00000002.old").is_dir()
    else:
        assert ckpt.list_checkpoints(tmp_path) == paths
        assert ckpt.latest_valid(tmp_path) == paths[-1]
    ckpt.save(tmp_path, {"step": np.int32(4), "w": np.zeros(2, np.float32)}, step=4)
    assert not_checkpoints(tmp_path) == []  # ... and removed by the next save, which put step 2 back
    assert ckpt.list_checkpoints(tmp_path)[:2] == paths
    assert {p: state_bytes(p) for p in paths} == before


@pytest.mark.slow
def test_sigkill_during_an_async_save_while_training_leaves_older_checkpoints_intact(tmp_path):
    code = f"""
import os, signal, sys, jax, jax.numpy as jnp, numpy as np
from fundl.train import checkpoint as ckpt
d = {str(tmp_path)!r}
ckpt.save(d, {{"step": np.int32(1), "w": np.ones(3, np.float32)}}, step=1)
ckpt.save(d, {{"step": np.int32(2), "w": np.ones(3, np.float32)}}, step=2)
import threading
from fundl.train.checkpoint.saver import Checkpointer
Checkpointer._commit = lambda self: threading.Event().wait()  # the kill lands inside the save, whatever the load
saver = ckpt.Checkpointer(d, keep=1)
state = {{"step": jnp.int32(3), "w": jax.random.normal(jax.random.key(0), (4096, 2048))}}
saver.save(state, step=3)
step = jax.jit(lambda t: {{"step": t["step"] + 1, "w": t["w"] + 1}}, donate_argnums=0)
state = jax.block_until_ready(step(state))
print("pending", saver.pending is not None, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    r = _run(code)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "pending True" in r.stdout
    before = {p: ckpt.load_arrays(p)["w"].tobytes() for p in ckpt.list_checkpoints(tmp_path)}
    assert [p.name for p in before] == ["step_00000001", "step_00000002"]  # no step_3, nothing pruned
    assert not_checkpoints(tmp_path) == [f"step_00000003{TMP}"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both older ones verify
        assert ckpt.latest_valid(tmp_path).name == "step_00000002"
    with ckpt.Checkpointer(tmp_path) as saver:  # the next run's first save removes the leftover
        saver.save({"step": np.int32(4), "w": np.zeros(3, np.float32)}, step=4)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert not_checkpoints(tmp_path) == []


# ------------------------------------------------------------ corruption
def _truncate(path):
    f = data_file(path)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_byte(path):
    f = data_file(path)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _garble_manifest(path):
    (path / "manifest.json").write_text('{"step": 3, "sha')


def _remove_data(path):
    data_file(path).unlink()


def _remove_manifest(path):
    (path / "manifest.json").unlink()


@pytest.mark.parametrize("corrupt,why", [(_truncate, "is corrupt: sha256"), (_flip_byte, "is corrupt: sha256"),
                                         (_garble_manifest, "manifest.json is corrupt"),
                                         (_remove_data, "has no state/ocdbt.process_0/d/"),
                                         (_remove_manifest, "has no manifest.json")])
def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path, corrupt, why):
    paths, state = save_steps(tmp_path)
    corrupt(paths[-1])
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint") as record:
        found = ckpt.latest_valid(tmp_path)
    assert found == paths[-2]
    msg = str(record[0].message)
    assert str(paths[-1]) in msg and why in msg
    leaves_equal(ckpt.restore(found, state)[0], bump(state, 2))
    with pytest.raises(ckpt.CheckpointError, match=why):
        ckpt.restore(paths[-1], state)  # a direct restore checks too


def test_a_corrupt_file_under_state_is_named_and_latest_valid_falls_back(tmp_path):
    state = cnn_state(steps=0)
    old = ckpt.save(tmp_path, state, step=1)
    new = ckpt.save(tmp_path, state, step=2)
    f = data_file(new)  # array data, the biggest file of the OCDBT store
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint {f} is corrupt: sha256"):
        ckpt.restore(new, state)
    with pytest.warns(UserWarning, match=f"skipping corrupt checkpoint: checkpoint {f} is corrupt"):
        assert ckpt.latest_valid(tmp_path) == old


@pytest.mark.parametrize("damage,why", [
    (lambda p: (p / "manifest.json").write_text((p / "manifest.json").read_text()[:50]), "manifest.json is corrupt"),
    (lambda p: (p / "manifest.json").unlink(), "never committed by fundl"),
])
def test_a_truncated_or_missing_manifest(tmp_path, damage, why):
    state = cnn_state(steps=0)
    old = ckpt.save(tmp_path, state, step=1)
    new = ckpt.save(tmp_path, state, step=2)
    damage(new)
    with pytest.raises(ckpt.CheckpointError, match=why):
        ckpt.restore(new, state)
    with pytest.warns(UserWarning, match=why):
        assert ckpt.latest_valid(tmp_path) == old


def test_a_corrupt_newest_checkpoint_is_replaced_when_its_step_is_saved_again(tmp_path):
    """Resumed from an older checkpoint past a corrupt one, the run saves that step again."""
    paths, state = save_steps(tmp_path, steps=(1, 2))
    _flip_byte(paths[-1])
    with pytest.warns(UserWarning):
        assert ckpt.latest_valid(tmp_path) == paths[0]
    with ckpt.Checkpointer(tmp_path, keep=2) as saver:
        saver.save(bump(state, 7), step=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpt.latest_valid(tmp_path) == paths[-1]
    leaves_equal(ckpt.restore(paths[-1], state)[0], bump(state, 7))
    assert not_checkpoints(tmp_path) == []


def test_every_checkpoint_corrupt_is_a_clear_error(tmp_path):
    paths, _ = save_steps(tmp_path)
    _truncate(paths[0])
    _flip_byte(paths[1])
    _garble_manifest(paths[2])
    with pytest.warns(UserWarning):
        with pytest.raises(ckpt.CheckpointError) as info:
            ckpt.latest_valid(tmp_path)
    msg = str(info.value)
    assert f"no valid checkpoint in {tmp_path}" in msg
    assert all(str(p) in msg for p in paths)


def test_no_checkpoint_at_all_is_none(tmp_path):
    assert ckpt.latest_valid(tmp_path) is None
    assert ckpt.latest_valid(tmp_path / "missing") is None


def test_an_unknown_format_says_what_it_is(tmp_path):
    path = ckpt.save(tmp_path, cnn_state(steps=0), step=1)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format": 3}))
    with pytest.raises(ckpt.CheckpointError, match="has format 3; this fundl reads formats 1 .* and 2 .*upgrade fundl"):
        ckpt.read_manifest(path)


# ---------------------------------------------------------- older formats
def test_a_format_1_checkpoint_still_restores_verifies_and_mixes_with_format_2(tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(FORMAT1, directory)
    old = directory / "step_00000007"
    assert ckpt.read_manifest(old)["format"] == 1 and (old / "arrays.npz").is_file()
    template = cnn_state(steps=0)
    restored, manifest = ckpt.restore(old, template)
    assert manifest["step"] == 7 and manifest["extras"]["run_id"] == "format1"
    with np.load(old / "arrays.npz") as f:  # what the old save wrote, leaf by leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
            assert host(leaf).tobytes() == f[jax.tree_util.keystr(path, simple=True, separator="/")].tobytes()
    assert int(restored.step) == 7 and jax.random.key_impl(restored.key) == jax.random.key_impl(template.key)
    # restored onto a sharding, too (what resume asks for)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), template)
    assert_bit_equal(ckpt.restore(old, abstract)[0], restored)
    assert ckpt.latest_valid(directory) == old
    # a newer format-2 checkpoint of the same run: newest wins, keep-K prunes the format-1 one
    new = ckpt.save(directory, restored, step=8, extras={"run_id": "format1"}, keep=1)
    assert ckpt.latest_valid(directory) == new and ckpt.list_checkpoints(directory) == [new]
    # a corrupt format-1 file is still detected
    shutil.copytree(FORMAT1 / "step_00000007", old)
    data = bytearray((old / "arrays.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (old / "arrays.npz").write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="arrays.npz is corrupt: sha256"):
        ckpt.restore(old, template)


@pytest.mark.slow
def test_a_format_2_checkpoint_from_before_orbaxs_manager_restores_and_mixes_with_new_ones(tmp_path):
    """Written by fundl's own commit on Orbax's Checkpointer (no step files of Orbax's manager):
    it verifies, restores bit for bit, counts for keep-K of its run, and catches corruption."""
    directory = tmp_path / "checkpoints"
    shutil.copytree(FORMAT2, directory)
    old = directory / "step_00000007"
    assert ckpt.read_manifest(old)["format"] == 2 and not (old / "_CHECKPOINT_METADATA").exists()
    template = cnn_state(steps=0)
    restored, manifest = ckpt.restore(old, template)
    assert manifest["step"] == 7 and manifest["extras"] == {"loader": {"epoch": 1, "index": 3}, "run_id": "format2"}
    with np.load(str(FORMAT2) + ".npz") as want:  # its arrays, as that fundl's load_arrays read them
        got = ckpt.flatten_state(restored)
        assert sorted(got) == sorted(want.files) and all(got[k].tobytes() == want[k].tobytes() for k in want.files)
    assert jax.random.key_impl(restored.key) == jax.random.key_impl(template.key)
    assert ckpt.latest_valid(directory) == old
    with ckpt.Checkpointer(directory, keep=2, extras={"run_id": "format2"}) as saver:
        saver.save(bump(restored, 1), step=8)
        saver.wait()
        assert ckpt.list_checkpoints(directory) == [old, directory / "step_00000008"]  # K = 2: both kept
        saver.save(bump(restored, 2), step=9)
    assert [p.name for p in ckpt.list_checkpoints(directory)] == ["step_00000008", "step_00000009"]
    shutil.copytree(FORMAT2 / "step_00000007", old)
    _flip_byte(old)
    with pytest.raises(ckpt.CheckpointError, match="is corrupt: sha256"):
        ckpt.restore(old, template)


# ------------------------------------------------------------- shardings
SHARDINGS = """
import sys, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from fundl.train import checkpoint as ckpt
d, devices = sys.argv[1], jax.devices()

def mesh(n):
    return Mesh(np.array(devices[:n]), ("data",))

def state_on(n):
    m = mesh(n)
    w = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
    return {"step": jax.device_put(jnp.int32(9), NamedSharding(m, P())),
            "w": jax.device_put(w, NamedSharding(m, P("data"))),          # split over the devices
            "b": jax.device_put(jnp.ones(6, jnp.bfloat16), NamedSharding(m, P())),
            "key": jax.device_put(jax.random.key(3), NamedSharding(m, P()))}

def target_on(n):
    m = mesh(n)
    s = {"step": P(), "w": P("data"), "b": P(), "key": P()}
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(m, s[k])) for k, v in state_on(1).items()}

def check(restored, n):
    want = state_on(1)
    for k in want:
        a, b = restored[k], want[k]
        if k == "key":
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes() and a.dtype == b.dtype, k
    w = restored["w"]
    if n:
        assert len(w.sharding.device_set) == n and w.sharding.spec == P("data"), w.sharding
        assert [s.data.shape for s in w.addressable_shards] == [(8 // n, 6)] * n
    else:  # a plain template: onto the default device
        assert w.sharding.device_set == {devices[0]}

for saved_on, restored_on in [(4, 2), (4, 1), (2, 4)]:
    path = ckpt.save(f"{d}/{saved_on}", state_on(saved_on), step=9)
    check(ckpt.restore(path, target_on(restored_on))[0], restored_on)
    check(ckpt.restore(path, state_on(restored_on))[0], restored_on)  # jax.Array leaves: their shardings
plain = jax.tree.map(lambda x: x if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else np.asarray(x), state_on(1))
check(ckpt.restore(f"{d}/4/step_00000009", plain)[0], 0)
print("OK")
"""


PLACEMENTS = """
import sys, jax, jax.numpy as jnp, numpy as np, optax
from fundl import models
from fundl.train import checkpoint as ckpt
from fundl.train.placement import make_placement
from fundl.train.state import create_train_state
d = sys.argv[1]
state = create_train_state(models.mlp([64], 8), optax.adam(1e-3), jax.random.key(0), (1, 32))
state = state.replace(params=jax.tree.map(lambda x: x + 0.5, state.params))  # not the fresh init
want = ckpt.flatten_state(state)
place = lambda mode, n: make_placement(mode, n, min_size=16)

def split(tree):  # leaves held in pieces (not replicated): fsdp's point
    return sum(1 for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) and not x.is_fully_replicated)

fsdp4 = place("fsdp", 4)
placed = fsdp4.put_state(state)
assert split(placed) > 0
path = ckpt.save(f"{d}/fsdp4", fsdp4.saveable(placed), step=0)
for mode, n in [("fsdp", 2), ("fsdp", 1), ("sharding", 2), ("pmap", 4), ("none", 1)]:
    p = place(mode, n)
    restored, _ = ckpt.restore(path, p.restore_target(state))
    if mode == "fsdp" and n == 2:
        assert split(restored) > 0 and all(len(x.sharding.device_set) == 2 for x in jax.tree.leaves(restored))
    got = ckpt.flatten_state(p.get_state(p.put_state(restored)))
    assert sorted(got) == sorted(want) and all(got[k].tobytes() == want[k].tobytes() for k in want), (mode, n)
pmap4 = place("pmap", 4)
path = ckpt.save(f"{d}/pmap4", pmap4.saveable(pmap4.put_state(state)), step=0)  # and back: pmap -> fsdp
p = place("fsdp", 4)
got = ckpt.flatten_state(p.get_state(p.put_state(ckpt.restore(path, p.restore_target(state))[0])))
assert all(got[k].tobytes() == want[k].tobytes() for k in want)
# a format-1 checkpoint (arrays.npz) restores onto fsdp's shardings too
template = create_train_state(models.cnn([2], [], 3, batch_norm=True), optax.adam(1e-2), jax.random.key(0), (1, 6, 6, 1))
p = place("fsdp", 2)  # the model's leaves have dimensions of 18 and 2: split over 2 devices
restored, _ = ckpt.restore(sys.argv[2], p.restore_target(template))
assert split(restored) > 0
with np.load(sys.argv[2] + "/arrays.npz") as f:
    got = ckpt.flatten_state(p.get_state(restored))
    assert sorted(got) == sorted(f.files) and all(got[k].tobytes() == f[k].tobytes() for k in f.files)
print("OK")
"""


# Both scripts above run in one process of 4 devices, each in a namespace of its own, its output
# captured; a failure of one is reported and the other still runs.
FOUR_DEVICES = """
import contextlib, io, json, sys, traceback, jax
jax.config.update("jax_num_cpu_devices", 4)
results = {}
for name, code, argv in [("SHARDINGS", sys.argv[1], sys.argv[3:4]), ("PLACEMENTS", sys.argv[2], sys.argv[3:])]:
    sys.argv, out, error = ["-c", *argv], io.StringIO(), None
    try:
        with contextlib.redirect_stdout(out):
            exec(code, {"__name__": "__main__"})
    except BaseException:
        error = traceback.format_exc()
    results[name] = {"out": out.getvalue(), "error": error}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def on_four_devices(tmp_path_factory):
    """What SHARDINGS and PLACEMENTS printed and raised, run in one process of 4 devices."""
    d = tmp_path_factory.mktemp("four")
    r = subprocess.run([sys.executable, "-c", FOUR_DEVICES, SHARDINGS, PLACEMENTS, str(d),
                        str(FORMAT1 / "step_00000007")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_restore_onto_other_shardings_and_device_counts(on_four_devices):
    """Saved with a leaf split over 4 devices, restored split over 2 and onto 1; saved on 2,
    restored on 4 (Orbax reshards); a plain template restores onto the default device."""
    r = on_four_devices["SHARDINGS"]
    assert r["error"] is None and "OK" in r["out"], r["error"]


@pytest.mark.slow
def test_a_checkpoint_moves_between_placements_and_device_counts(on_four_devices):
    """fsdp on 4 devices -> fsdp on 2 (still split) and on 1, sharding on 2, pmap on 4, one device;
    pmap on 4 -> fsdp on 4; format 1 -> fsdp on 2: through each placement's saveable /
    restore_target / put_state."""
    r = on_four_devices["PLACEMENTS"]
    assert r["error"] is None and "OK" in r["out"], r["error"]


@pytest.mark.slow
def test_two_processes_write_their_own_shards_and_one_process_resumes(tmp_path, capsys):
    """fsdp over 2 processes x 2 devices: each process writes its own shards into one checkpoint
    (per-process OCDBT files, all checksummed in the manifest); a single process on 4 devices
    resumes it, then one on 1 device reads it."""
    from test_multihost import launch_train  # a test module beside this one (pytest puts tests/ on the path)

    split = ["--set", "parallel.fsdp_min_size=16", "--set", "logging.plots=false"]
    code, out = launch_train(tmp_path, capsys, *split, mode="fsdp")
    assert code == 0, out[-4000:]
    run = tmp_path / "run"
    path = ckpt.latest_valid(run / "checkpoints")
    assert path.name == "step_00000024"
    files = ckpt.read_manifest(path)["files"]
    for i in (0, 1):  # both processes wrote array data
        assert any(f.startswith(f"state/ocdbt.process_{i}/d/") for f in files), sorted(files)
    assert not_checkpoints(run / "checkpoints") == []
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--resume", str(run), "--quiet",
                        "--local-devices", "4", "--set", 'parallel.mode="fsdp"', "--set", "training.steps=36",
                        "--allow-change", "training.steps"], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={**os.environ, "MPLBACKEND": "Agg"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert ckpt.latest_valid(run / "checkpoints").name == "step_00000036"
    arrays = ckpt.load_arrays(path)  # this process, one device
    assert int(arrays["step"]) == 24 and arrays["params/dense_0/w"].shape == (16, 16)


# ----------------------------------------------------- fit and the CLI
def _tiny():
    ds = load_dataset("synthetic", num_train=256, num_test=64, input_shape=(8,), num_classes=3, seed=0)
    model, opt = models.mlp([16], 3), optax.adam(1e-2)
    fresh = lambda: create_train_state(model, opt, jax.random.key(0), (1, 8))  # noqa: E731
    return fresh, make_train_step(model, opt), Loader(ds.train, 32, seed=1, drop_last=True, prefetch=0)


@pytest.mark.slow
def test_the_cli_trains_and_resumes_in_a_relative_run_directory(tmp_path, monkeypatch):
    """Trained into runs/tiny from tmp_path (the run layer), resumed there by the command line's main
    (both in this process)."""
    from fundl.run import config as cfg
    from fundl.run import experiment

    monkeypatch.chdir(tmp_path)
    config = cfg.load_config(ROOT / "configs" / "tiny_synthetic.toml", ["logging.plots=false"])
    assert experiment.run(config, "runs/tiny", verbose=False)["final_step"] == 24
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000024" / "manifest.json").is_file()
    from fundl.run.cli import train_main  # the command line's main, in this process

    monkeypatch.delenv("FUNDL_TRACEBACK", raising=False)
    again = train_main(["--config", str(ROOT / "configs" / "tiny_synthetic.toml"), "--quiet", "--set",
                        "logging.plots=false", "--run-dir", "runs/tiny", "--resume", "--set", "training.steps=36",
                        "--allow-change", "training.steps"])
    assert again == 0
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "step_00000036" / "manifest.json").is_file()


@pytest.mark.slow
def test_fit_with_async_checkpoints_writes_what_sync_checkpoints_write(tmp_path):
    fresh, step, loader = _tiny()
    for mode in (True, False):
        rd = RunDir(tmp_path / str(mode))
        with ckpt.Checkpointer(rd.checkpoint_dir, keep=5, async_save=mode) as saver:
            fit(fresh(), step, loader, num_steps=12, every=Every(log=4, checkpoint=4), checkpoints=saver,
                on_log=rd.log, progress=False)
    a, b = (ckpt.list_checkpoints(tmp_path / str(m) / "checkpoints") for m in (True, False))
    assert [p.name for p in a] == [p.name for p in b] == ["step_00000004", "step_00000008", "step_00000012"]
    for x, y in zip(a, b):
        ax, by = ckpt.load_arrays(x), ckpt.load_arrays(y)
        assert all(ax[k].tobytes() == by[k].tobytes() for k in ax)


@pytest.mark.slow
def test_a_stop_signal_names_a_committed_checkpoint_while_saves_are_slow(tmp_path, monkeypatch):
    """Saves that take longer than steps: the SIGTERM path waits for the pending one, so the
    checkpoint TrainingInterrupted names exists and verifies when the exception is raised."""
    fresh, step, loader = _tiny()
    real = Checkpointer._commit
    monkeypatch.setattr(Checkpointer, "_commit", lambda self: (threading.Event().wait(0.3), real(self)))

    def stop(record):
        if record["step"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    rd = RunDir(tmp_path)
    with pytest.raises(TrainingInterrupted) as info, ckpt.Checkpointer(rd.checkpoint_dir, keep=3) as saver:
        fit(fresh(), step, loader, num_steps=20, every=Every(log=2, checkpoint=2), checkpoints=saver,
            progress=False, on_log=stop)
    e = info.value
    assert e.step == 6 and e.checkpoint == rd.checkpoint_dir / "step_00000006"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpt.read_manifest(e.checkpoint)["step"] == 6  # committed, checksums verify
        assert ckpt.latest_valid(rd.checkpoint_dir) == e.checkpoint


@pytest.mark.slow
def test_a_failed_background_save_stops_fit_with_the_write_error(tmp_path, monkeypatch):
    fresh, step, loader = _tiny()
    real = Checkpointer._commit

    def full_disk(self):
        if self.pending.name == "step_00000008":
            raise ValueError("Failed to write 4096 bytes to file 11: No space left on device [os_error_code='28']")
        real(self)

    monkeypatch.setattr(Checkpointer, "_commit", full_disk)
    rd = RunDir(tmp_path)
    with pytest.raises(ckpt.CheckpointWriteError, match="could not write checkpoint .*step_00000008: No space left"), \
            ckpt.Checkpointer(rd.checkpoint_dir, keep=3) as saver:
        fit(fresh(), step, loader, num_steps=20, every=Every(log=4, checkpoint=4), checkpoints=saver,
            on_log=rd.log, progress=False)
    assert [p.name for p in ckpt.list_checkpoints(rd.checkpoint_dir)] == ["step_00000004"]
    assert [p.name for p in rd.checkpoint_dir.iterdir() if p.name.startswith(".")] == []
    assert not_checkpoints(rd.checkpoint_dir) == []
