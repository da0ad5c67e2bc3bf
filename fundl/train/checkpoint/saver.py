"""Saving train states: :class:`Checkpointer` (asynchronous, keep-K) and :func:`save` (one synchronous save).

Orbax's CheckpointManager writes (configured in ``orbax_manager``);
this module is what fundl promises on top: the manifest and its extras, one
pending save at a time, errors that name the checkpoint and the newest intact
one, and leftovers of killed saves put right before the next save.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import jax

from fundl.train.checkpoint.errors import CheckpointError, CheckpointWriteError
from fundl.train.checkpoint.manifest import (
    FORMAT_VERSION, PREFIX, checkpoint_name, fsync_dir, list_checkpoints, write_manifest,
)
from fundl.train.checkpoint.tree import nest, shape_dtype, stored_leaves

SET_ASIDE = ".old"  # a checkpoint being saved again waits as .step_N.old until the new copy is committed
_POLL_S = 0.01  # how often wait(timeout) looks whether Orbax has finished


@dataclasses.dataclass
class _Pending:
    """The save in flight: its final folder, its manifest (less ``files``), a set-aside old copy."""

    final: Path
    manifest: dict
    aside: Path | None = None

    @property
    def step(self) -> int:
        return self.manifest["step"]

    @property
    def run_id(self):
        return self.manifest["extras"].get("run_id")


class Checkpointer:
    """Saves train states into ``directory`` with Orbax's CheckpointManager; asynchronous by default.

    Every process calls :meth:`save` with the same global state (jax.Arrays of
    any sharding; Orbax writes each process's shards).  With ``async_save``
    the call returns once Orbax holds the state (its device buffers copied, so
    the next training step may donate them); the write, process 0's commit
    (checksums and manifest, then Orbax's rename) and keep-K pruning run in
    the background.  :meth:`wait` blocks until the pending save is committed
    and returns its path, or raises its error (:class:`CheckpointWriteError`
    for I/O failures); every process's :meth:`wait` returns only after process
    0 committed.  :meth:`save` waits for the previous save first, so at most
    one is pending.  Use it as a context manager or call :meth:`close`.  In a
    multi-process run every process creates it and calls every method.

    Args:
        directory: the run's ``checkpoints/`` folder (created on the first save).
        keep: K: after each save, delete all but the K newest of this run's
            checkpoints (other runs' and newer ones are kept);
            None or 0 keeps all.
        async_save: False makes :meth:`save` return only once committed.
        extras: a JSON-serialisable dict stored in every manifest (the config,
            the run id), under each save's own ``extras``.

    One writer per directory: from its first save until :meth:`close`, a
    checkpointer holds a lock on the directory (process 0; the kernel drops it
    when the process ends, however it ends), and a second writer's first save
    raises :class:`CheckpointError` instead of deleting the first one's save
    in progress (Orbax's manager removes every temporary folder it finds).

    Examples:
        >>> import tempfile
        >>> from fundl.train import checkpoint as ckpt
        >>> state = {"step": jnp.int32(3), "w": jnp.ones((2, 2))}
        >>> with ckpt.Checkpointer(tempfile.mkdtemp(), keep=2, extras={"run_id": "a"}) as saver:
        ...     path = saver.save(state, step=3)        # returns at once; written in the background
        ...     saver.wait() == path                    # committed: checksummed, renamed into place
        True
        >>> ckpt.read_manifest(path)["extras"]
        {'run_id': 'a'}
    """

    def __init__(self, directory: str | Path, *, keep: int | None = 3, async_save: bool = True,
                 extras: dict | None = None):
        self.directory = Path(directory)
        self.keep, self.async_save = keep, async_save
        self.extras = dict(extras or {})
        json.dumps(self.extras)  # not serialisable: fail here, not at the first save
        self.primary = jax.process_index() == 0
        self.last_committed: Path | None = None
        self._manager = None  # Orbax's CheckpointManager, made by the first save
        self._lock: int | None = None  # process 0: the directory, locked from the first save to close()
        self._pending: _Pending | None = None
        self._quiet = _QuietOrbaxErrors()
        _import_orbax_in_background()

    # ----------------------------------------------------------- public
    def save(self, state, *, step: int, extras: dict | None = None) -> Path:
        """Start saving ``state`` as ``directory/step_<step>``; return that path (committed by
        :meth:`wait`).  ``extras``: a JSON-serialisable dict stored in the manifest, over the
        constructor's."""
        self.wait()
        leaves = stored_leaves(state)
        manifest = {"format": FORMAT_VERSION, "step": int(step),
                    "leaves": {p: {"shape": list(s), "dtype": d} for p, (s, d) in
                               ((p, shape_dtype(x)) for p, x in leaves)},
                    "extras": {**self.extras, **(extras or {})}}
        json.dumps(manifest)  # not serialisable: fail here, before anything is written
        pending = _Pending(self.directory / checkpoint_name(step), manifest)
        try:
            manager = self._open()
        except OSError as e:  # the directory cannot be made or read: nothing was written
            raise write_error(e, pending.final, self.directory) from e
        logging.getLogger("absl").addFilter(self._quiet)
        try:
            from fundl.train.checkpoint import orbax_manager

            pending.aside = self._set_aside(manager, pending)
            self._pending = pending
            manager.save(pending.step, args=orbax_manager.save_args(nest(dict(leaves))), force=True)
        except BaseException as e:
            raise self._failed(e, pending)
        if not self.async_save:
            self.wait()
        return pending.final

    def wait(self, timeout: float | None = None) -> Path | None:
        """Block until the pending save is committed; return the newest committed checkpoint
        (None if none was saved), or raise the pending save's error.  With ``timeout`` (seconds),
        give up waiting after that long: the save stays pending (see :attr:`pending`)."""
        pending = self._pending
        if pending is None:
            return self.last_committed
        if timeout is not None and not self._finishes_within(timeout):
            return self.last_committed
        try:
            self._manager.wait_until_finished()
        except BaseException as e:
            raise self._failed(e, pending)
        self._pending = None
        logging.getLogger("absl").removeFilter(self._quiet)
        if self.primary:
            fsync_dir(self.directory)  # the rename into place, durable
            if pending.aside is not None:
                shutil.rmtree(pending.aside, ignore_errors=True)
            self._empty_trash()
        self.last_committed = pending.final
        return pending.final

    @property
    def pending(self) -> Path | None:
        """The checkpoint being written (not yet committed), or None."""
        return None if self._pending is None else self._pending.final

    def close(self, timeout: float | None = None) -> Path | None:
        """Wait for the pending save (raising its error), then release Orbax's resources.
        ``timeout``: as for :meth:`wait`; a save still pending then is abandoned (Orbax finishes
        it in the background or, if the process ends first, the next save removes its leftovers)."""
        try:
            return self.wait(timeout)
        finally:
            if self._pending is None:  # else abandoned: Orbax may still commit it, under the lock
                manager, self._manager = self._manager, None
                if manager is not None:
                    manager.close()
                if self._lock is not None:
                    os.close(self._lock)
                    self._lock = None
            logging.getLogger("absl").removeFilter(self._quiet)

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
    def _open(self):
        """Orbax's manager, made on the first save after putting right what killed saves left."""
        if self._manager is None:
            from fundl.train.checkpoint import orbax_manager

            if self.primary:
                self.directory.mkdir(parents=True, exist_ok=True)
                if self._lock is None:
                    self._lock = _lock(self.directory)
                _tidy(self.directory)
            self._manager = orbax_manager.make_manager(
                self.directory, keep=self.keep, commit=lambda: self._commit(),
                saving=lambda: None if self._pending is None else (self._pending.step, self._pending.run_id))
        return self._manager

    def _commit(self) -> None:
        """fundl's commit, run by Orbax on process 0 once every process's write is done, before
        its rename: hash and fsync every file, write the manifest into the temporary folder."""
        from fundl.train.checkpoint import orbax_manager

        write_manifest(orbax_manager.temporary_folder(self._pending.final), self._pending.manifest)

    def _set_aside(self, manager, pending: _Pending) -> Path | None:
        """Saving a step again: its folder waits as ``.step_N.old`` (out of Orbax's sight, which
        refuses existing steps) until the new copy is committed; a failed save puts it back."""
        if pending.step not in manager.all_steps():
            return None
        aside = pending.final.with_name(f".{pending.final.name}{SET_ASIDE}")
        if self.primary:
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(pending.final, aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"fundl checkpoint: {pending.final.name} set aside")
        manager.reload()
        return aside

    def _empty_trash(self) -> None:
        """Delete the checkpoints keep-K pruned (Orbax renamed them into the trash folder)."""
        from fundl.train.checkpoint.orbax_manager import TRASH

        shutil.rmtree(self.directory / TRASH, ignore_errors=True)

    def _finishes_within(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._manager.is_saving_in_progress():
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)
        return True

    def _failed(self, error: BaseException, pending: _Pending) -> BaseException:
        """After a failed save: let Orbax's part of it end, remove the partial copy, put a set-aside
        checkpoint back, and drop the manager (a later save makes a fresh one, which reads the
        folder again and inherits nothing of this failure); return the error to raise."""
        from fundl.train.checkpoint import orbax_manager

        self._pending = None
        manager, self._manager = self._manager, None
        if manager is not None:
            try:
                manager.close()  # waits for Orbax's background part of this save
            except BaseException:  # noqa: BLE001 - part of the failure being raised
                pass
        if self.primary:
            shutil.rmtree(orbax_manager.temporary_folder(pending.final), ignore_errors=True)
            if pending.aside is not None and pending.aside.exists() and not pending.final.exists():
                os.replace(pending.aside, pending.final)
            self._empty_trash()
        logging.getLogger("absl").removeFilter(self._quiet)
        _quiet_orphaned_orbax_tasks()
        return write_error(error, pending.final, self.directory)


def save(directory: str | Path, state, *, step: int, extras: dict | None = None,
         keep: int | None = None) -> Path:
    """Write ``state`` as ``directory/step_<step>`` (format 2) and return its path once committed.

    ``extras`` is any JSON-serialisable dict (loader position, config hash).
    ``keep`` = K deletes all but the K newest checkpoints of this run afterwards.
    Synchronous; use :class:`Checkpointer` to save in the background.
    """
    with Checkpointer(directory, keep=keep, async_save=False) as saver:
        return saver.save(state, step=step, extras=extras)


def _lock(directory: Path) -> int | None:
    """An exclusive lock on ``directory`` (its file descriptor), or CheckpointError naming it."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CheckpointError(
            f"another writer is saving checkpoints into {directory} (another process, or another "
            f"Checkpointer not closed yet); one writer per folder: close it or choose another folder") from None
    except OSError:  # a filesystem without locks on directories: go on unguarded
        os.close(fd)
        return None
    return fd


def _tidy(directory: Path) -> None:
    """Before Orbax lists the steps (process 0): put back a checkpoint set aside by a re-save that
    was killed, delete the trash of an interrupted prune, and the hidden temporary folders of
    saves killed under fundl before it saved through Orbax's manager (``.step_N.tmp-PID``,
    ``.del-PID``, ``.old-PID``).  Orbax removes its own temporary folders."""
    from fundl.train.checkpoint.orbax_manager import TRASH

    for p in directory.iterdir():
        if p.name == TRASH:
            shutil.rmtree(p, ignore_errors=True)
            continue
        if not p.name.startswith("." + PREFIX):
            continue
        base, _, kind = p.name[1:].partition(".")
        if kind.startswith("old") and not (directory / base).exists():
            os.replace(p, directory / base)
        elif kind.startswith(("old", "tmp-", "del-")):
            shutil.rmtree(p, ignore_errors=True)


class _QuietOrbaxErrors(logging.Filter):
    """Orbax logs every failure of a background save with a traceback at ERROR level before
    raising it; fundl raises it again with a message that says what to do, so while this
    checkpointer's save is in flight its filter drops those duplicate logs (nothing else)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


class _OrphanedOrbaxTasks(logging.Filter):
    """When one fragment of a save fails, Orbax stops waiting for the others; the ones that fail
    too are never awaited, and asyncio logs each, with a traceback, whenever the garbage
    collector meets it (``Task exception was never retrieved``), often after the command has
    printed its error.  The save's error was raised already (:class:`CheckpointWriteError`), so
    this filter drops those logs, and only those: tasks of other code still log."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not ("never retrieved" in text and "orbax" in text)


_ORPHANED_ORBAX_TASKS = _OrphanedOrbaxTasks()


def _quiet_orphaned_orbax_tasks() -> None:
    """After a failed save: asyncio drops the logs of that save's unawaited tasks, for as long as
    the process lives (they are collected whenever the garbage collector runs)."""
    logger = logging.getLogger("asyncio")
    if _ORPHANED_ORBAX_TASKS not in logger.filters:
        logger.addFilter(_ORPHANED_ORBAX_TASKS)


def _import_orbax_in_background() -> None:
    """Start importing Orbax (it takes a while: docs/benchmarks.md) while training compiles and
    runs, so the first save does not wait for it.  (Python's import lock makes a concurrent
    import safe: the first save's ``import`` waits for this one to finish.)"""
    if "orbax.checkpoint" not in sys.modules:
        threading.Thread(target=_import_orbax, name="fundl-import-orbax", daemon=True).start()


def _import_orbax() -> None:
    import orbax.checkpoint  # noqa: F401


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


def write_error(e: BaseException, final: Path, directory: Path) -> BaseException:
    """The error to raise for a failed save of ``final``: a :class:`CheckpointWriteError` for I/O
    failures (with the errno, the newest intact checkpoint and what to do), ``e`` itself otherwise."""
    if isinstance(e, CheckpointWriteError):
        return e
    code = _errno_of(e)
    if code is None:
        return e
    intact = list_checkpoints(directory)
    newest = f"the newest intact checkpoint is {intact[-1]}" if intact else "no earlier checkpoint exists"
    hint = " Free some disk space or choose another run directory." if code == errno.ENOSPC else ""
    err = CheckpointWriteError(
        code, f"could not write checkpoint {final}: {os.strerror(code)}. The partial copy was removed and "
              f"earlier checkpoints are untouched; {newest}.{hint}")
    err.__cause__ = e
    return err
