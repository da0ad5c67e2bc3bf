"""The one place where errors become what the command line prints and its exit code.

Every error prints one line on stderr, ``fundl: error: MESSAGE``, and at most one more,
``fundl: hint: ...``; never a traceback unless asked for (``--debug`` or ``FUNDL_DEBUG=1``;
``FUNDL_TRACEBACK=1`` too).  Warnings print one line each, ``fundl: warning: ...``
(:func:`one_line_warnings`).

| error | exit code |
|---|---|
| bad input: ``ConfigError`` (a config, ``--set``, ``--sweep``, a flag), ``RunDirError`` (a run directory in use or holding another run), and every ``ValueError`` -- the library's errors about what it was given (``DataError`` and ``ExampleError``, ``LayerError``/``ShapeError``, ``OptimizerError``, ...) | 2 |
| a runtime failure: an ``OSError`` (disk full, permissions: the path and what was kept are named), ``CheckpointError``, ``NonFiniteLossError``, ``DistributedError``, any ``RuntimeError`` (XLA's: out of memory, ...) | 1 |
| anything else (``TypeError``, ``KeyError``, ...: a bug), as ``internal error`` with a hint to ``--debug`` | 1 |
| ``TrainingInterrupted`` (SIGTERM / SIGINT during training, checkpoint saved) and ``KeyboardInterrupt`` | 128 + signal: 130 / 143 |
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path

from fundl.run.config import ConfigError
from fundl.run.distributed import DistributedError
from fundl.run.rundir import RunDirError

BAD_INPUT, FAILURE = 2, 1
DEBUG_HINT = "--debug (or FUNDL_DEBUG=1) shows the traceback"


def debugging(flag: bool = False) -> bool:
    """Whether tracebacks are wanted: ``--debug``, ``FUNDL_DEBUG=1`` or ``FUNDL_TRACEBACK=1``."""
    return bool(flag) or any(os.environ.get(v, "") not in ("", "0") for v in ("FUNDL_DEBUG", "FUNDL_TRACEBACK"))


def _known_failures() -> tuple:
    """Runtime failures whose message says it all (no "internal error" hint).  Only modules
    already loaded are asked (an error cannot come from one that is not), so reporting an error
    imports nothing: a start-up interrupted inside ``import jax`` leaves JAX half-imported."""
    found = [DistributedError, OSError, MemoryError]
    for module, name in (("fundl.train.checkpoint.errors", "CheckpointError"), ("fundl.train.loop", "NonFiniteLossError")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)


def message_and_code(e: BaseException, run_dir: str | os.PathLike | None = None) -> tuple[str, str, int]:
    """``(message, hint, exit code)`` for ``e`` as the module doc's table says (``hint`` may be "")."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (SIGINT)", _interrupted_hint(run_dir), 128 + signal.SIGINT
    if _is_interruption(e):
        return str(e), "", e.exit_code
    text, rest = _two_lines(str(e) or type(e).__name__)
    notes = " ".join(line.strip() for note in getattr(e, "__notes__", ()) for line in str(note).splitlines()
                     if line.strip() and not _jax_note(line))
    text += f" {notes}" if notes else ""
    if isinstance(e, (ConfigError, RunDirError)):
        return text, rest, BAD_INPUT
    if isinstance(e, DistributedError):  # the multi-process start-up: its message says it all
        return text, rest, FAILURE
    if isinstance(e, ValueError):
        return f"{type(e).__name__}: {text}", rest, BAD_INPUT
    if isinstance(e, OSError) and not _is_library_error(e):
        return _os_error(e), rest or _kept_hint(run_dir), FAILURE
    if isinstance(e, _known_failures() + (RuntimeError, ArithmeticError)):  # XLA's runtime errors (out of memory, ...)
        return f"{type(e).__name__}: {text}", rest or _kept_hint(run_dir, e), FAILURE
    return f"internal error: {type(e).__name__}: {text}", f"this is a bug; {DEBUG_HINT}", FAILURE


def is_known(e: BaseException) -> bool:
    """Whether ``e`` is one of the errors whose message says what happened: bad input, an I/O
    failure, a checkpoint or divergence error, an interrupt -- not an XLA runtime error (a dead
    peer's, in a multi-process run) nor a bug."""
    return isinstance(e, (ConfigError, RunDirError, ValueError, KeyboardInterrupt) + _known_failures()) \
        or _is_interruption(e)


def report_error(e: BaseException, *, debug: bool = False, run_dir: str | os.PathLike | None = None,
                 at_start_up: bool = False) -> int:
    """Print ``e`` as the module doc says (its traceback first when :func:`debugging`) and return
    its exit code.  ``run_dir``: the run the error stopped, whose kept files a hint may name.
    (``at_start_up`` is accepted for older callers; start-up errors print the same way.)"""
    try:
        message, hint, code = message_and_code(e, run_dir)
    except Exception:  # noqa: BLE001 - the report itself must not fail: the plain message then
        message, hint, code = f"{type(e).__name__}: {e}", DEBUG_HINT, FAILURE
    if debugging(debug) and not _is_interruption(e):
        traceback.print_exception(e, file=sys.stderr)
    prefix = "fundl: " if _is_interruption(e) or isinstance(e, KeyboardInterrupt) else "fundl: error: "
    print(prefix + message, file=sys.stderr)
    if hint:
        print(f"fundl: hint: {hint}", file=sys.stderr)
    sys.stderr.flush()
    return code


def _two_lines(message: str) -> tuple[str, str]:
    """A message of several lines as (the error, the hint): the first line with the indented lines
    that follow it (a list of keys, say), then the other lines as the hint."""
    lines = [line for line in message.splitlines() if line.strip()]
    head, i = [lines[0].strip()], 1
    while i < len(lines) and lines[i][:1].isspace():
        head.append(lines[i].strip())
        i += 1
    return " ".join(head[:1] + ["; ".join(head[1:])]).strip(), " ".join(line.strip() for line in lines[i:])


def _jax_note(line: str) -> bool:
    """A line of the note JAX adds about the frames it filtered out of a traceback."""
    return not line.strip("- ") or "JAX has removed its internal frames" in line or "JAX_TRACEBACK_FILTERING" in line


def _is_interruption(e: BaseException) -> bool:
    if "fundl.train.signals" not in sys.modules:  # never raised before training imported it
        return False
    from fundl.train.signals import TrainingInterrupted

    return isinstance(e, TrainingInterrupted)


def _is_library_error(e: OSError) -> bool:
    """An OSError subclass of fundl's own (a data or checkpoint error), whose message is complete."""
    return type(e).__module__.startswith("fundl.")


def _os_error(e: OSError) -> str:
    """An I/O error as one line naming the path: ``could not write PATH: No space left on device``."""
    path = e.filename if e.filename is not None else None
    reason = e.strerror or str(e)
    if path is None:
        return reason
    writing = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
    return f"could not {'write' if writing else 'access'} {path}: {reason}" + (f" (and {e.filename2})" if e.filename2 else "")


def _checkpoints(run_dir) -> list[str]:
    """The names of the checkpoints in ``run_dir`` (what a failed or stopped run kept), oldest first."""
    folder = Path(run_dir) / "checkpoints" if run_dir is not None else None
    if folder is None or not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and p.name[5:].isdigit())


def _kept_hint(run_dir, e: BaseException | None = None) -> str:
    """What an I/O failure kept of the run in ``run_dir``, and the command that continues it."""
    if run_dir is None or e is not None and not isinstance(e, OSError):
        return ""
    from fundl.run.rundir import previous_run

    steps = _checkpoints(run_dir)
    if steps:
        return (f"{run_dir} keeps its checkpoints ({', '.join(steps[-3:])}); once the cause is fixed, continue "
                f"with: {resume_command(run_dir)}")
    if not previous_run(run_dir):
        return f"nothing of this run was kept in {run_dir}; once the cause is fixed, run the same command again"
    return f"{run_dir} holds no checkpoint of this run; once the cause is fixed, run the same command with --overwrite"


def _interrupted_hint(run_dir) -> str:
    steps = _checkpoints(run_dir)
    if steps:
        return f"no new checkpoint was saved; continue from {steps[-1]} with: {resume_command(run_dir)}"
    return "nothing was saved; run the same command again to start"


def resume_command(run_dir: str | os.PathLike) -> str:
    """The command that continues the run in ``run_dir``."""
    return f"python scripts/train.py --resume {Path(run_dir)}"


def with_resume_hint(e, run_dir: str | os.PathLike):
    """A ``TrainingInterrupted`` that says how to resume the run in ``run_dir`` (when it saved a checkpoint)."""
    from fundl.train.signals import TrainingInterrupted

    if e.checkpoint is None:
        return e
    return TrainingInterrupted(e.signum, e.step, e.checkpoint, f"resume with: {resume_command(run_dir)}")


@contextlib.contextmanager
def one_line_warnings(debug: bool = False):
    """While a command runs: warnings print as one line each, ``fundl: warning: MESSAGE``; an
    error in a background thread prints one such line; and what Python prints of errors nobody
    can catch prints nothing -- errors in finalisers or callbacks (a failed asynchronous
    checkpoint write leaves Orbax's threads calling a closed event loop: the error the run
    reports says what happened), and a Ctrl-C that C code printed while it cut an import short
    (numpy's).  With ``debug`` everything prints as Python prints it.  The hooks are restored
    on exit."""
    if debugging(debug):
        yield
        return
    import threading

    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        print(f"fundl: warning: {text}", file=file or sys.stderr)

    def thread_failed(args):
        if args.exc_type is not SystemExit:
            text = " ".join(str(args.exc_value).split())[:300]
            print(f"fundl: warning: a background thread failed: {args.exc_type.__name__}: {text}", file=sys.stderr)

    def printed_by_c(exc_type, exc, tb):
        if not issubclass(exc_type, KeyboardInterrupt):
            print(f"fundl: error: {exc_type.__name__}: {' '.join(str(exc).split())[:500]}", file=sys.stderr)

    hooks = ((warnings, "showwarning", show), (sys, "unraisablehook", quiet_unraisable),
             (threading, "excepthook", thread_failed), (sys, "excepthook", printed_by_c))
    saved = [getattr(owner, name) for owner, name, _ in hooks]
    for owner, name, hook in hooks:
        setattr(owner, name, hook)
    try:
        yield
    finally:  # each hook back, unless replaced meanwhile (the multi-process exit hook: fundl.run.distributed)
        for (owner, name, hook), before in zip(hooks, saved):
            if getattr(owner, name) is hook:
                setattr(owner, name, before)


def quiet_unraisable(unraisable) -> None:
    """``sys.unraisablehook`` that prints nothing (see :func:`one_line_warnings`)."""
