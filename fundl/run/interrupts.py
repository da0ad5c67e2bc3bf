"""Ctrl-C at any moment of a command, start-up included: one message, exit 130, nothing blocked.

:class:`Interrupts` remembers a SIGINT while a command runs (``fundl.run.cli``), so that an
error it caused is reported as the interrupt it is, and re-sends one that Python dropped;
:func:`exit_with` leaves at once after an interrupt.  Training itself stops on a signal at a
step boundary with a checkpoint (``fundl.train.signals``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

from fundl.run.errors import debugging, quiet_unraisable


class Interrupts:
    """While a command runs, SIGINT raises KeyboardInterrupt as usual, and is remembered: an error it
    caused (an import it cut short) is reported as the interrupt it is.  Python runs a signal's
    handler wherever the main thread is, also inside a garbage-collection callback, whose
    exceptions are dropped; so until the interrupt is seen, it is sent again (every 0.3 s) -- to
    ``fit``'s handler too, once, which then stops training cleanly at the next step."""

    def __init__(self):
        self.received, self.done, self.previous = False, False, None

    def _handler(self, signum, frame):
        if not self.received:
            self.received = True
            threading.Thread(target=self._repeat, daemon=True, name="fundl-sigint").start()
        raise KeyboardInterrupt

    def _repeat(self):
        while not self.done:
            time.sleep(0.3)
            if self.done:
                return
            ours = signal.getsignal(signal.SIGINT) == self._handler
            os.kill(os.getpid(), signal.SIGINT)
            if not ours:  # training's own handler (fundl.train.signals): one request is enough
                return

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def settle(self) -> None:
        """The command is ending: no more repeats, and a late SIGINT cannot cut its report short."""
        self.done = True
        if self.previous is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc):
        self.done = True
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


@contextlib.contextmanager
def held_while_loading():
    """Hold a SIGINT until the block ends: Python raises KeyboardInterrupt wherever the main thread
    is, and one raised while a native library (jaxlib, tensorstore) initialises can crash the
    process (SIGSEGV) instead of stopping it.  The held signal then goes to the handler before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held and callable(previous):
            previous(signal.SIGINT, None)


def stopped_by_signal(e: BaseException) -> bool:
    """A ``TrainingInterrupted``: training stopped cleanly on a signal (it has its own message)."""
    signals = sys.modules.get("fundl.train.signals")
    return signals is not None and isinstance(e, signals.TrainingInterrupted)


def exit_with(code: int) -> None:
    """Exit with ``code``; after an interrupt (130 / 143) at once, past the interpreter's shutdown:
    a Ctrl-C that cut JAX's start-up short can leave its shutdown hooks to crash (the run
    directory's files are written and closed; a stopped training committed its checkpoint)."""
    if code in (130, 143):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if not debugging():
        sys.unraisablehook = quiet_unraisable  # what background threads drop while Python shuts down
    sys.exit(code)
