"""Stop training cleanly on SIGTERM/SIGINT: checkpoint at the next step boundary, then exit.

:class:`StopSignals` is a context manager used by ``fit``.  While it is
active, SIGTERM and SIGINT only set a flag; the loop polls
:meth:`StopSignals.should_stop` after every dispatch, saves a checkpoint of
the step it has reached and raises :class:`TrainingInterrupted`.  A second
signal of the same kind while the first is being handled restores the
original handler and re-delivers it (press Ctrl-C twice to abort at once).

Multi-process runs (``jax.process_count() > 1``) must all save the *same*
step, so they do not catch SIGTERM themselves: JAX's preemption service
(started by ``jax.distributed.initialize``) receives it, and every process
asks ``multihost_utils.reached_preemption_sync_point(i)`` at each dispatch
``i``; it turns true on all processes at the same ``i``.

Exit codes (see ``scripts/train.py``): 128 + the signal number, i.e. 143 for
SIGTERM and 130 for SIGINT, as a shell reports a process killed by them, so
schedulers that requeue on 143 keep working.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings

import jax


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint.

    Attributes: ``signal_name``, ``step`` (the step saved), ``checkpoint``
    (its path, or None when nothing was saved), ``exit_code`` (128 + signal
    number) and ``resume_hint``, which ends the message: whoever knows how
    this run resumes (the command line, for one) sets it before re-raising.
    """

    def __init__(self, signum: int, step: int, checkpoint=None, resume_hint: str = ""):
        super().__init__(signum, step, checkpoint, resume_hint)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.step = step
        self.checkpoint = checkpoint
        self.exit_code = 128 + int(signum)
        self.resume_hint = resume_hint

    def __str__(self) -> str:
        where = f"saved checkpoint {self.checkpoint}" if self.checkpoint else "no checkpoints, so nothing was saved"
        hint = f"; {self.resume_hint}" if self.resume_hint else ""
        return f"training stopped by {self.signal_name} at step {self.step}; {where}{hint}"


class StopSignals:
    """Turn SIGTERM/SIGINT into a request to stop at the next step boundary."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), *, multiprocess: bool | None = None):
        self.signals = tuple(signals)
        self.multiprocess = jax.process_count() > 1 if multiprocess is None else multiprocess
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._sync_available = True

    def _handler(self, signum, frame):
        if self.received is not None:  # second signal: give up on the clean stop
            self._restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        # In multi-process runs SIGTERM belongs to JAX's preemption service, and a
        # SIGINT seen by one process alone cannot stop all of them at the same step.
        wanted = () if self.multiprocess else self.signals
        for s in wanted:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()

    def should_stop(self, sync_id: int) -> bool:
        """True when the loop should checkpoint and stop after dispatch ``sync_id``.

        ``sync_id`` must increase by one per dispatch and be the same on every
        process (the dispatch count since ``fit`` started serves).
        """
        if not self.multiprocess:
            return self.received is not None
        if not self._sync_available:
            return False
        from jax.experimental import multihost_utils

        try:
            stop = multihost_utils.reached_preemption_sync_point(sync_id)
        except RuntimeError as e:  # the preemption service is not running
            warnings.warn(f"SIGTERM will not checkpoint: JAX's preemption sync point is unavailable ({e}); "
                          f"call jax.distributed.initialize() before training", stacklevel=2)
            self._sync_available = False
            return False
        if stop:
            self.received = signal.SIGTERM
        return stop
