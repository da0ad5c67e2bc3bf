"""The one place where errors become what the command line prints and its exit code.

| error | printed on stderr | exit code |
|---|---|---|
| ``ConfigError``: a bad command line or config | ``config error: MESSAGE`` | 2 |
| ``RunDirError``: a run directory in use or holding another run | ``error: MESSAGE`` | 2 |
| ``DistributedError``: the multi-process start-up failed | ``error: MESSAGE`` | 1 |
| one of :func:`user_errors`, whose message says it all | ``error: TYPE: MESSAGE`` and a hint | 1 |
| ``TrainingInterrupted``: SIGTERM / SIGINT, checkpoint saved | ``fundl: MESSAGE`` (how to resume) | 128 + signal |
| anything else | the traceback | 1 |

``FUNDL_TRACEBACK=1`` shows the traceback of an error of the run instead (not
of a training interruption, which is no error, nor of the command line's
start-up: ``report_error(..., at_start_up=True)``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fundl.run.config import ConfigError
from fundl.run.distributed import DistributedError
from fundl.run.rundir import RunDirError


def user_errors() -> tuple:
    """Errors whose message says all a user needs: the command line prints them without a traceback."""
    from fundl.data import DataError, DataNotFoundError, DownloadError
    from fundl.nn import LayerError
    from fundl.train.checkpoint import CheckpointError, CheckpointWriteError
    from fundl.train.loop import NonFiniteLossError

    return (LayerError, DataError, DataNotFoundError, DownloadError, CheckpointError, CheckpointWriteError,
            NonFiniteLossError, PermissionError)


def message_and_code(e: BaseException) -> tuple[str, int] | None:
    """What the table of the module doc says for ``e``: ``(message, exit code)``; None for
    anything else (a traceback)."""
    if isinstance(e, ConfigError):  # these first: the command line's start-up has not imported JAX
        return f"config error: {e}", 2
    if isinstance(e, RunDirError):
        return f"error: {e}", 2
    if isinstance(e, DistributedError):
        return f"error: {e}", 1
    from fundl.train.signals import TrainingInterrupted

    if isinstance(e, TrainingInterrupted):
        return f"fundl: {e}", e.exit_code
    if isinstance(e, user_errors()):
        return f"error: {type(e).__name__}: {e}\n(set FUNDL_TRACEBACK=1 for the traceback)", 1
    return None


def report_error(e: BaseException, *, at_start_up: bool = False) -> int | None:
    """Print ``e`` as one message on stderr and return its exit code; None when the caller should
    re-raise it (a traceback): an error not in the table, or ``FUNDL_TRACEBACK`` set for an error
    of the run.  ``at_start_up``: the command line's checks before the run (its config, the
    multi-process start-up), always one message."""
    found = message_and_code(e)
    if found is None:
        return None
    if os.environ.get("FUNDL_TRACEBACK") and not at_start_up and not _interruption(e):
        return None
    message, code = found
    print(message, file=sys.stderr)
    return code


def _interruption(e: BaseException) -> bool:
    from fundl.train.signals import TrainingInterrupted

    return isinstance(e, TrainingInterrupted)


def resume_command(run_dir: str | os.PathLike) -> str:
    """The command that continues the run in ``run_dir``."""
    return f"python scripts/train.py --resume {Path(run_dir)}"


def with_resume_hint(e, run_dir: str | os.PathLike):
    """A ``TrainingInterrupted`` that says how to resume the run in ``run_dir`` (when it saved a checkpoint)."""
    from fundl.train.signals import TrainingInterrupted

    if e.checkpoint is None:
        return e
    return TrainingInterrupted(e.signum, e.step, e.checkpoint, f"resume with: {resume_command(run_dir)}")
