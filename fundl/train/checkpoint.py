"""Checkpoints of a whole train state: Orbax storage under fundl's guarantees.

Layout of a run's ``checkpoints/`` folder (format 2)::

    step_00000100/state/         an Orbax checkpoint (StandardCheckpointHandler) of the state: a
                                 nested dict by tree path ({"params": {"dense_0": {"w": ...}}, ...}),
                                 typed PRNG keys as their key data; each process writes its shards
    step_00000100/manifest.json  format 2, step, every leaf's path/shape/dtype, extras, and the
                                 sha256 of every file under state/

``state/`` is an ordinary Orbax checkpoint, so other JAX tools can read it
(``orbax.checkpoint.StandardCheckpointer().restore(path / "state")``); fundl
adds what Orbax does not promise:

* **atomic commit**: every process writes into ``.step_N.tmp-PID/state``;
  when all are done, process 0 hashes and fsyncs every file, writes the
  manifest and renames the folder to ``step_N`` (then fsyncs the parent).
  A crash at any point leaves older checkpoints untouched and a hidden
  temporary folder that the next save removes.
* **checksums**: :func:`read_manifest` (and so :func:`restore` and
  :func:`latest_valid`) verifies every file's sha256; a flipped byte, a
  truncated or a missing file makes the checkpoint invalid, and
  :func:`latest_valid` falls back to an older one with a warning.
* **restore by tree path** into a template, with path/shape/dtype
  mismatches listed; the template's leaves may be ``jax.Array`` s or
  ``jax.ShapeDtypeStruct`` s with shardings (Orbax reshards: a checkpoint
  saved on 4 devices restores on 2), or plain arrays (restored onto the
  default device).
* **keep-K** pruning of this run's older checkpoints, and a clear
  :class:`CheckpointWriteError` when the disk is full.

:class:`Checkpointer` saves asynchronously: ``save`` returns once Orbax has
the state (device buffers copied), training continues, and the commit runs in
a background thread after Orbax finishes; ``wait()`` (called by the next
save, at the end of ``fit``, on a stop signal and on errors) returns the
committed checkpoint or raises the save's error.

Format 1 (``arrays.npz`` + manifest, fundl before Orbax) still restores.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fundl.train.state import is_prng_key

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
_PREFIX = "step_"
STATE_DIR = "state"  # format 2: the Orbax checkpoint inside a step folder
_STATUS_TIMEOUT_S = 1200  # other processes wait this long for process 0's commit (Orbax's own default)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names its path and why."""


class CheckpointWriteError(OSError):
    """Saving a checkpoint failed (disk full, permissions, ...).

    Raised by :func:`save` / :meth:`Checkpointer.wait` with the errno of the
    underlying error; the message names the checkpoint, the reason and the
    newest intact one.  The temporary folder has been removed and older
    checkpoints are untouched.
    """


def _path_str(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def flatten_state(state) -> dict[str, np.ndarray]:
    """``{tree path: numpy array}``; typed PRNG keys become their key data."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if is_prng_key(leaf):
            leaf = jax.random.key_data(leaf)
        out[_path_str(path)] = np.asarray(jax.device_get(leaf))
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path, *, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{int(step):08d}"


def step_of(path: str | Path) -> int:
    """The step of checkpoint folder ``path`` (from its name)."""
    return int(Path(path).name[len(_PREFIX):])


# ------------------------------------------------------------ state <-> Orbax tree
def _leaf_data(leaf):
    """What is stored for a leaf: typed PRNG keys as their key data; jax.Arrays as they are
    (any sharding, possibly not fully addressable); anything else as NumPy."""
    if is_prng_key(leaf):
        return jax.random.key_data(leaf)
    return leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)


def _nest(flat: dict[str, Any]) -> dict:
    """``{"params/dense_0/w": x}`` -> ``{"params": {"dense_0": {"w": x}}}`` (Orbax's tree)."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, name = path.split("/") if path else ["_"]
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = value
    return tree


def _unnest(tree: dict, paths) -> list:
    out = []
    for path in paths:
        node = tree
        for p in (path.split("/") if path else ["_"]):
            node = node[p]
        out.append(node)
    return out


def _shape_dtype(x) -> tuple[tuple, str]:
    return tuple(x.shape), str(np.dtype(x.dtype))


def _key_impl(leaf):
    """The PRNG implementation of a typed key leaf (an array or a ShapeDtypeStruct of key dtype)."""
    try:
        return jax.random.key_impl(leaf)
    except TypeError:
        return leaf.dtype._impl  # a ShapeDtypeStruct: its key dtype carries the implementation


def _template_leaves(template) -> tuple[list, Any, dict]:
    """The template's ``(path, leaf)`` list, treedef, and ``{path: (shape, dtype)}`` of what is stored."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    expected = {}
    for p, leaf in leaves:
        if is_prng_key(leaf):
            data = jax.eval_shape(jax.random.key_data, leaf)
            expected[_path_str(p)] = (tuple(data.shape), str(np.dtype(data.dtype)))
        elif isinstance(leaf, jax.ShapeDtypeStruct):
            expected[_path_str(p)] = (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
        else:
            expected[_path_str(p)] = (tuple(np.shape(leaf)), str(jnp.result_type(leaf)))
    return [(_path_str(p), leaf) for p, leaf in leaves], treedef, expected


def _target_sharding(leaf):
    """Where a restored leaf goes: the template leaf's sharding, else this process's first device."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if is_prng_key(leaf) and isinstance(leaf, jax.Array):
        return jax.random.key_data(leaf).sharding
    return sharding  # key data: a NamedSharding's spec leaves the trailing key axis replicated


# --------------------------------------------------------------------- Orbax
_ORBAX_ACTIVE = 0  # saves in flight: while > 0, Orbax's own error logs are dropped (fundl raises them)
_ACTIVE_LOCK = threading.Lock()


class _QuietOrbaxErrors(logging.Filter):
    """Orbax logs every failure of a background write with a traceback at ERROR level before
    raising it; fundl raises it again with a message that says what to do, so those duplicate
    logs are dropped while a fundl save is in flight (nothing else is touched)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_ORBAX_ACTIVE and record.levelno >= logging.ERROR and "orbax" in record.pathname)


_FILTER = _QuietOrbaxErrors()


def _orbax():
    import orbax.checkpoint as ocp

    return ocp


def _import_orbax_in_background() -> None:
    """Start importing Orbax (about a second) while training compiles and runs, so the first
    save does not wait for it.  (Python's import lock makes a concurrent import safe: the
    first save's ``import`` waits for this one to finish.)"""
    if "orbax.checkpoint" not in sys.modules:
        threading.Thread(target=_orbax, name="fundl-import-orbax", daemon=True).start()


def _orbax_checkpointer():
    """A new Orbax async checkpointer of pytrees (StandardCheckpointHandler)."""
    ocp = _orbax()
    absl_logger = logging.getLogger("absl")
    if _FILTER not in absl_logger.filters:
        absl_logger.addFilter(_FILTER)
    # Directories are created before save() returns (not in Orbax's background), so that a save
    # that fails leaves nothing that could appear after fundl removed its temporary folder.
    return ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(),
                                 async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False))


_OS_ERROR = re.compile(r"os_error_code='?(\d+)")


def _errno_of(e: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the ``os_error_code`` in the message of
    the errors TensorStore raises through Orbax (``... No space left on device [os_error_code='28']``)."""
    for x in (e, e.__cause__, e.__context__):
        if isinstance(x, OSError) and x.errno:
            return x.errno
        m = _OS_ERROR.search(str(x)) if x is not None else None
        if m:
            return int(m.group(1))
    return None


def _write_error(e: BaseException, final: Path, directory: Path) -> BaseException:
    """The error to raise for a failed save: CheckpointWriteError for I/O failures (with the
    errno, the newest intact checkpoint and what to do), ``e`` itself otherwise."""
    if isinstance(e, CheckpointWriteError):
        return e
    code = _errno_of(e)
    if code is None:
        return e
    intact = list_checkpoints(directory)
    newest = f"the newest intact checkpoint is {intact[-1]}" if intact else "no earlier checkpoint exists"
    reason = os.strerror(code)
    hint = " Free some disk space or choose another run directory." if code == errno.ENOSPC else ""
    err = CheckpointWriteError(
        code, f"could not write checkpoint {final}: {reason}. The partial copy was removed and "
              f"earlier checkpoints are untouched; {newest}.{hint}")
    err.__cause__ = e
    return err


# --------------------------------------------------------------- Checkpointer
_IN_FLIGHT: set[str] = set()  # temporary folders of this process's saves in progress (never stale)
_SAVES: dict[str, int] = {}  # saves of each checkpoint folder by this process: names the status key


def _key(path: Path) -> str:
    return os.path.realpath(path)


def _process_zero_pid() -> int:
    """Process 0's pid, on every process: the temporary folder all processes write into is named with it."""
    if jax.process_count() == 1:
        return os.getpid()
    from jax.experimental import multihost_utils

    return int(np.asarray(multihost_utils.broadcast_one_to_all(np.int32(os.getpid()))))


def _distributed_client():
    from jax._src import distributed

    return distributed.global_state.client


class Checkpointer:
    """Saves train states into ``directory``: Orbax writes, fundl commits; asynchronous by default.

    Every process calls :meth:`save` with the same global state (jax.Arrays of
    any sharding; Orbax writes each process's shards).  With ``async_save``
    the call returns once Orbax holds the state (its device buffers copied, so
    the next training step may donate them); the write, then process 0's
    commit (checksums, manifest, rename, keep-K pruning) run in a background
    thread.  :meth:`wait` blocks until the pending save is committed and
    returns its path, or raises its error (:class:`CheckpointWriteError` for
    I/O failures); every process's :meth:`wait` returns only after process 0
    committed.  :meth:`save` waits for the previous save first, so at most
    one is pending.  Use it as a context manager or call :meth:`close`.
    In a multi-process run every process creates it (that agrees on the
    temporary folder's name through a collective) and calls every method.

    Examples:
        >>> import tempfile
        >>> from fundl.train import checkpoint as ckpt
        >>> state = {"step": jnp.int32(3), "w": jnp.ones((2, 2))}
        >>> with ckpt.Checkpointer(tempfile.mkdtemp(), keep=2) as saver:
        ...     path = saver.save(state, step=3)        # returns at once; written in the background
        ...     saver.wait() == path                    # committed: checksummed, renamed into place
        True
    """

    def __init__(self, directory: str | Path, *, keep: int | None = None, async_save: bool = True,
                 extras: dict | None = None):
        self.directory = Path(directory)
        self.keep, self.async_save = keep, async_save
        self.extras = dict(extras or {})  # in every manifest, under each save's own extras
        self.primary = jax.process_index() == 0
        self._tag = _process_zero_pid()  # the same temporary folder name on every process
        self._orbax, self._owns_orbax = None, True
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending: Path | None = None
        self.last_committed: Path | None = None
        if self.primary and self.directory.is_dir():
            _remove_stale(self.directory)  # leftovers of saves killed in an earlier run
        _import_orbax_in_background()

    # ----------------------------------------------------------- public
    def save(self, state, *, step: int | None = None, extras: dict | None = None) -> Path:
        """Start saving ``state`` as ``directory/step_<step>``; return that path (committed by
        :meth:`wait`).  ``extras``: a JSON-serialisable dict stored in the manifest."""
        global _ORBAX_ACTIVE
        self.wait()
        leaves = [(_path_str(p), _leaf_data(x)) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]]
        flat = dict(leaves)
        if step is None:
            step = int(np.asarray(_host_value(flat["step"])).reshape(-1)[0])
        step = int(step)
        final = self.directory / checkpoint_name(step)
        tmp = self.directory / f".{final.name}.tmp-{self._tag}"
        manifest = {"format": FORMAT_VERSION, "step": step,
                    "leaves": {p: {"shape": list(s), "dtype": d} for p, (s, d) in
                               ((p, _shape_dtype(x)) for p, x in leaves)},
                    "extras": {**self.extras, **(extras or {})}}
        json.dumps(manifest)  # not serialisable: fail here, before anything is written
        seq = _SAVES[str(final)] = _SAVES.get(str(final), 0) + 1  # the same on every process
        _IN_FLIGHT.add(_key(tmp))
        with _ACTIVE_LOCK:
            _ORBAX_ACTIVE += 1
        try:
            if self.primary:
                self.directory.mkdir(parents=True, exist_ok=True)
                _remove_stale(self.directory)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            if self._orbax is None:
                self._orbax = _orbax_checkpointer()
            # Orbax takes absolute paths only (run directories are often relative: runs/NAME)
            self._orbax.save((tmp / STATE_DIR).absolute(), args=_orbax().args.StandardSave(_nest(flat)))
        except BaseException as e:
            self._settle_orbax()  # its background part of this save must not write after the removal
            self._done(tmp)
            if self.primary:
                shutil.rmtree(tmp, ignore_errors=True)
            raise _write_error(e, final, self.directory)
        self._pending = final
        if self.async_save:
            self._thread = threading.Thread(target=self._finish, args=(final, tmp, manifest, seq),
                                            name=f"fundl-checkpoint-{step}", daemon=True)
            self._thread.start()
        else:
            self._finish(final, tmp, manifest, seq)
            self.wait()
        return final

    def wait(self, timeout: float | None = None) -> Path | None:
        """Block until the pending save is committed; return the newest committed checkpoint
        (None if none was saved), or raise the pending save's error.  With ``timeout`` (seconds),
        give up waiting after that long: the save stays pending (see :attr:`pending`)."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return self.last_committed
            self._thread = None
        if self._error is not None:
            e, self._error, self._pending = self._error, None, None
            raise e
        if self._pending is not None:
            self.last_committed, self._pending = self._pending, None
        return self.last_committed

    @property
    def pending(self) -> Path | None:
        """The checkpoint being written (not yet committed), or None."""
        return self._pending

    def close(self, timeout: float | None = None) -> Path | None:
        """Wait for the pending save (raising its error), then release Orbax's resources.
        ``timeout``: as for :meth:`wait`; a save still pending then is abandoned (its temporary
        folder is removed by the next save into this directory)."""
        try:
            return self.wait(timeout)
        finally:
            if self._thread is not None:
                self._thread = None  # abandoned: a daemon thread, it ends with the process
            elif self._orbax is not None and self._owns_orbax:
                self._orbax.close()
            self._orbax = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            self.close()
            return
        try:  # an error is on its way out: still finish (or clean up) the pending save
            self.close()
        except BaseException as e:  # noqa: BLE001 - reported on the error that is propagating
            exc.add_note(f"(the pending checkpoint save failed too: {e})")

    # ---------------------------------------------------------- internals
    def _wait_for_orbax(self) -> None:
        """Orbax's background write (every process's shards) and its finalisation, done."""
        self._orbax.wait_until_finished()

    def _settle_orbax(self) -> None:
        """After a failed save: let Orbax's own background work for it end (its errors belong to
        the failure being raised), and never hand that Orbax checkpointer to a later save, which
        would inherit its pending error (bug: a failed save made the next, unrelated save fail)."""
        if self._orbax is None:
            return
        try:
            self._orbax.wait_until_finished()
        except BaseException:  # noqa: BLE001 - part of the failure already being raised
            pass
        if _SHARED[0] is self._orbax:  # (only module-level save() shares it, holding _SHARED_LOCK)
            _SHARED[0] = None
        try:
            self._orbax.close()
        except BaseException:  # noqa: BLE001 - as above
            pass
        self._orbax, self._owns_orbax = None, True  # a later save makes (and owns) a fresh one

    def _finish(self, final: Path, tmp: Path, manifest: dict, seq: int) -> None:
        """After Orbax: process 0 commits; every process learns the outcome (background thread)."""
        error: BaseException | None = None
        try:
            try:
                self._wait_for_orbax()
            except BaseException as e:
                raise _write_error(e, final, self.directory)
            if self.primary:
                _commit(tmp, final, manifest, self.directory)
                if self.keep:
                    prune(self.directory, final, self.keep)
        except BaseException as e:  # noqa: BLE001 - handed to wait()
            error = e
            self._settle_orbax()
            if self.primary:
                shutil.rmtree(tmp, ignore_errors=True)
                if not isinstance(e, CheckpointWriteError) and _errno_of(e) is not None:
                    error = _write_error(e, final, self.directory)  # message names the newest intact one
        finally:
            self._done(tmp)
        if jax.process_count() > 1:
            error = self._exchange_outcome(final, seq, error)
        self._error = error

    def _exchange_outcome(self, final: Path, seq: int, error):
        """Process 0 publishes its commit's outcome; the others wait for it (JAX's key-value store)."""
        key = f"fundl/checkpoint/{self._tag}/{final.name}/{seq}"
        client = _distributed_client()
        if self.primary:
            client.key_value_set(key, "" if error is None else f"{type(error).__name__}: {error}")
            return error
        try:
            outcome = client.blocking_key_value_get(key, _STATUS_TIMEOUT_S * 1000)
        except Exception as e:  # noqa: BLE001
            return CheckpointError(f"checkpoint {final}: process 0 did not report its commit ({e})")
        if outcome:
            return error or CheckpointError(f"checkpoint {final} was not committed by process 0: {outcome}")
        return error

    def _done(self, tmp: Path) -> None:
        global _ORBAX_ACTIVE
        _IN_FLIGHT.discard(_key(tmp))
        with _ACTIVE_LOCK:
            _ORBAX_ACTIVE = max(0, _ORBAX_ACTIVE - 1)


def _host_value(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return jax.device_get(x)


def _commit(tmp: Path, final: Path, manifest: dict, directory: Path) -> None:
    """Process 0, after every process's write: hash and fsync every file under ``state/``, write
    the manifest, fsync, and rename the temporary folder into place (re-saving a step swaps last)."""
    try:
        state = tmp / STATE_DIR
        if not state.is_dir():
            raise FileNotFoundError(errno.ENOENT, f"Orbax left no {state}")
        files = {}
        for f in sorted(state.rglob("*")):
            if f.is_file():
                files[f.relative_to(tmp).as_posix()] = _sha256(f, fsync=True)
        for d in sorted({state, *(f.parent for f in state.rglob("*") if f.is_file())}, key=lambda p: -len(p.parts)):
            _fsync_dir(d)
        _write_atomic_text(tmp / "manifest.json", json.dumps({**manifest, "files": files}, indent=1))
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step: replace the old copy last
            old = directory / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(directory)
    except OSError as e:
        raise _write_error(e, final, directory)


def save(directory: str | Path, state, *, step: int | None = None, extras: dict | None = None,
         keep: int | None = None) -> Path:
    """Write ``state`` as ``directory/step_<step>`` (format 2) and return its path once committed.

    ``extras`` is any JSON-serialisable dict (loader position, config hash).
    ``keep`` = K deletes all but the K newest checkpoints of this run afterwards.
    Synchronous; use :class:`Checkpointer` to save in the background.
    """
    with _SHARED_LOCK:  # one Orbax checkpointer for these calls: making one costs ~25 ms a save
        if _SHARED[0] is None:
            _SHARED[0] = _orbax_checkpointer()
        saver = Checkpointer(directory, keep=keep, async_save=False)
        saver._orbax, saver._owns_orbax = _SHARED[0], False
        with saver:
            return saver.save(state, step=step, extras=extras)


_SHARED: list = [None]
_SHARED_LOCK = threading.Lock()  # held by save() for a whole save


def prune(directory: str | Path, newest: Path, keep: int) -> list[Path]:
    """Delete this run's checkpoints older than ``newest`` beyond the ``keep`` newest; return them.

    "This run's" means: a step below ``newest``'s and, when ``newest``'s manifest
    records a ``run_id`` extra, the same ``run_id``.  So pruning never deletes
    the checkpoint just written, a newer one, or another run's.
    """
    step = step_of(newest)
    run_id = read_manifest(newest, verify=False).get("extras", {}).get("run_id")
    ours = [p for p in list_checkpoints(directory) if step_of(p) < step]
    if run_id is not None:
        ours = [p for p in ours if _run_id_of(p) == run_id]
    doomed = ours[:max(0, len(ours) - (keep - 1))]
    for old in doomed:
        _delete(old)
    return doomed


def _run_id_of(path: Path):
    try:
        return read_manifest(path, verify=False).get("extras", {}).get("run_id")
    except CheckpointError:
        return None  # incomplete or corrupt: not known to be this run's, left alone


def _delete(path: Path) -> None:
    """Remove a checkpoint folder: first renamed out of sight (atomic), then deleted."""
    trash = path.with_name(f".{path.name}.del-{os.getpid()}")
    try:
        os.replace(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _remove_stale(directory: Path) -> None:
    """Delete leftovers of saves that died midway (``.step_*.tmp-*``, ``.old-*``, ``.del-*``).

    Each name ends with a pid: the saving process's, or in a multi-process
    run process 0's (all processes write into one temporary folder; only
    process 0 cleans up).  Folders of a live process other than this one are
    left alone (a run directory's lock already keeps a second run out, this
    guards direct callers of ``save``), and so are this process's saves in
    progress.  A ``.old-*`` folder is renamed back when its step folder is
    missing (a crash between the two renames of a same-step re-save).
    """
    for p in directory.iterdir():
        name = p.name
        if not name.startswith("." + _PREFIX) or _key(p) in _IN_FLIGHT:
            continue
        base, _, kind = name[1:].rpartition(".")
        pid = kind.partition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        if kind.startswith("old-") and not (directory / base).exists():
            try:
                os.replace(p, directory / base)
                continue
            except OSError:
                pass
        if kind.startswith(("tmp-", "old-", "del-")):
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary folders excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
             and p.name[len(_PREFIX):].isdigit()]
    return sorted(found, key=step_of)


# ------------------------------------------------------------------- reading
def read_manifest(path: str | Path, *, verify: bool = True) -> dict:
    """The manifest of checkpoint ``path``; with ``verify``, check every data file's sha256."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        if (path / STATE_DIR).is_dir():
            raise CheckpointError(
                f"checkpoint {path} has no manifest.json: its {STATE_DIR}/ folder (an Orbax checkpoint) was "
                f"never committed by fundl (a save that did not finish, or a folder written by another "
                f"tool). fundl restores only committed checkpoints; read it with "
                f"orbax.checkpoint.StandardCheckpointer().restore({str(path / STATE_DIR)!r}) and save it "
                f"again with fundl.train.checkpoint.save") from None
        raise CheckpointError(f"checkpoint {path} has no manifest.json (incomplete or not a checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: manifest.json is corrupt ({e})") from None
    if not isinstance(manifest, dict) or "leaves" not in manifest:
        raise CheckpointError(f"checkpoint {path}: manifest.json lacks 'leaves'")
    fmt = manifest.get("format", 1)
    if fmt not in READABLE_FORMATS:
        raise CheckpointError(
            f"checkpoint {path} has format {fmt!r}; this fundl reads formats 1 (arrays.npz) and 2 "
            f"(an Orbax {STATE_DIR}/ folder). It was written by a newer fundl: upgrade fundl to read it")
    if fmt == 1 and "sha256" not in manifest:
        raise CheckpointError(f"checkpoint {path}: manifest.json (format 1) lacks 'sha256'")
    if fmt == 2 and not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"checkpoint {path}: manifest.json (format 2) lacks 'files'")
    if verify:
        if fmt == 1:
            _verify(path, "arrays.npz", manifest["sha256"])
        else:
            if not manifest["files"]:
                raise CheckpointError(f"checkpoint {path}: manifest.json lists no files")
            for name, digest in manifest["files"].items():
                _verify(path, name, digest)
    return manifest


def _verify(path: Path, name: str, digest: str) -> None:
    f = path / name
    if not f.is_file():
        raise CheckpointError(f"checkpoint {path} has no {name}")
    got = _sha256(f)
    if got != digest:
        raise CheckpointError(
            f"checkpoint {f} is corrupt: sha256 {got[:16]}... but the manifest "
            f"recorded {digest[:16]}... (truncated or modified file)")


def _describe_mismatches(expected: dict, got: dict, limit: int = 5) -> str:
    lines = []
    for p in list(expected) + [p for p in got if p not in expected]:  # the template's order: params first
        e, g = expected.get(p), got.get(p)
        if e == g:
            continue
        if e is None:
            lines.append(f"  {p}: in the checkpoint, not in the model's state {g}")
        elif g is None:
            lines.append(f"  {p}: expected {e}, missing from the checkpoint")
        else:
            lines.append(f"  {p}: expected {e}, checkpoint has {g}")
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


def restore(path: str | Path, template) -> tuple[Any, dict]:
    """Fill ``template`` (a state of the right structure) from checkpoint ``path``.

    The template's leaves say where each restored leaf goes: a ``jax.Array``
    or a ``jax.ShapeDtypeStruct`` with a ``sharding`` is restored with that
    sharding (any device count: Orbax reads just the shards each process
    needs); a plain or NumPy array, or a ShapeDtypeStruct without sharding, is
    restored onto this process's first device.  Typed PRNG keys are rewrapped
    with the template's implementation.

    Returns ``(state, manifest)``.  Raises CheckpointError on a checksum
    failure or when paths, shapes or dtypes differ from the template.
    """
    path = Path(path)
    manifest = read_manifest(path, verify=True)
    leaves, treedef, expected = _template_leaves(template)
    got = {p: (tuple(v["shape"]), v["dtype"]) for p, v in manifest["leaves"].items()}
    if expected != got:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model/optimiser state:\n{_describe_mismatches(expected, got)}")
    if manifest.get("format", 1) == 1:
        values = _read_npz(path, leaves)
    else:
        targets = {p: jax.ShapeDtypeStruct(expected[p][0], np.dtype(expected[p][1]), sharding=_target_sharding(leaf))
                   for p, leaf in leaves}
        values = _read_orbax(path, targets)
    out = []
    for (p, leaf), value in zip(leaves, values):
        out.append(jax.random.wrap_key_data(value, impl=_key_impl(leaf)) if is_prng_key(leaf) else value)
    return jax.tree_util.tree_unflatten(treedef, out), manifest


def _read_orbax(path: Path, targets: dict) -> list:
    ocp = _orbax()
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as reader:
            tree = reader.restore((path / STATE_DIR).absolute(), args=ocp.args.StandardRestore(_nest(targets)))
        return _unnest(tree, targets)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {STATE_DIR}/ with Orbax ({e})") from None


def _read_npz(path: Path, leaves) -> list:
    """Format 1: every leaf from arrays.npz, placed where the template leaf says."""
    try:
        with np.load(path / "arrays.npz", allow_pickle=False) as data:
            values = []
            for p, leaf in leaves:
                values.append(_place(data[p], _target_sharding(leaf)))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read arrays.npz ({e})") from None
    return values


def _place(x: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def load_arrays(path: str | Path, *, verify: bool = True) -> dict[str, np.ndarray]:
    """Every stored leaf of checkpoint ``path`` as NumPy, by tree path (typed keys as key data),
    without a template: for tools and tests.  Reads formats 1 and 2."""
    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    if manifest.get("format", 1) == 1:
        with np.load(path / "arrays.npz", allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    targets = {p: jax.ShapeDtypeStruct(tuple(v["shape"]), np.dtype(v["dtype"]), sharding=device)
               for p, v in manifest["leaves"].items()}
    return {p: np.asarray(v) for p, v in zip(targets, _read_orbax(path, targets))}


def latest_valid(directory: str | Path) -> Path | None:
    """The newest checkpoint whose manifest and checksums verify.

    Corrupt newer ones are skipped with a warning naming them.  None if the
    folder holds no checkpoint; CheckpointError if it holds only corrupt ones.
    """
    candidates = list_checkpoints(directory)
    errors = []
    for path in reversed(candidates):
        try:
            read_manifest(path, verify=True)
        except CheckpointError as e:
            warnings.warn(f"skipping corrupt checkpoint: {e}", stacklevel=2)
            errors.append(str(e))
            continue
        return path
    if errors:
        raise CheckpointError(
            f"no valid checkpoint in {directory}; every one failed verification:\n  " + "\n  ".join(errors))
    return None
