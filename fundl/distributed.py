"""Multi-process (multi-host) start-up with JAX's own distributed runtime.

Every process of a run calls :func:`initialize` before anything touches JAX
devices; it calls ``jax.distributed.initialize`` with bounded timeouts so a
peer that never starts or dies mid-run ends every other process with an
error instead of a hang:

* ``init_timeout`` (``initialization_timeout``): how long the processes wait
  for each other at start-up (a peer that never starts);
* ``heartbeat_timeout`` (``heartbeat_timeout_seconds``): after this long
  without heartbeats a process is declared dead and JAX's coordination
  service terminates the others (SIGABRT, with a "Terminating process
  because the JAX distributed service detected fatal errors" log line);
* ``shutdown_timeout`` (``shutdown_timeout_seconds``): how long a finishing
  process waits for the others at exit;
* ``collective_timeout`` (``XLA_FLAGS=--xla_cpu_collective_timeout_seconds``,
  CPU only): a collective stuck on a hung (alive but silent) peer becomes an
  error.

A peer that dies *during* a collective usually shows up faster: the CPU
collectives (gloo) see the closed connection and raise ``JaxRuntimeError``
at once.  In a multi-process run :func:`initialize` installs an exception
hook that prints which process failed and why, then leaves with
``os._exit(1)``: a normal interpreter exit would first wait for the
shutdown barrier of the runtime that the dead peer can never reach.

Settings come from command-line flags (:func:`add_arguments`) or, for those
not given, the environment (``FUNDL_COORDINATOR``, ``FUNDL_NUM_PROCESSES``,
``FUNDL_PROCESS_ID``, ``FUNDL_LOCAL_DEVICES``, ``FUNDL_INIT_TIMEOUT``,
``FUNDL_HEARTBEAT_TIMEOUT``, ``FUNDL_SHUTDOWN_TIMEOUT``,
``FUNDL_COLLECTIVE_TIMEOUT``), which is what ``scripts/launch_local.py``
sets.  With no coordinator this is a single-process run and
``jax.distributed`` is not used; ``local_devices`` still sets the number of
(fake) CPU devices.

Nothing here touches a JAX device before :func:`initialize` (which must
come first: JAX refuses to join a run once its backend has started).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Mapping

ENV = {
    "coordinator": "FUNDL_COORDINATOR",
    "num_processes": "FUNDL_NUM_PROCESSES",
    "process_id": "FUNDL_PROCESS_ID",
    "local_devices": "FUNDL_LOCAL_DEVICES",
    "init_timeout": "FUNDL_INIT_TIMEOUT",
    "heartbeat_timeout": "FUNDL_HEARTBEAT_TIMEOUT",
    "shutdown_timeout": "FUNDL_SHUTDOWN_TIMEOUT",
    "collective_timeout": "FUNDL_COLLECTIVE_TIMEOUT",
}


class DistributedError(RuntimeError):
    """A multi-process run that cannot start; the message says which setting to fix."""


@dataclass(frozen=True)
class Settings:
    """How this process joins a run.  ``coordinator=None``: a single-process run."""

    coordinator: str | None = None      # "HOST:PORT" of process 0's coordination service
    num_processes: int = 1
    process_id: int = 0
    local_devices: int = 0              # CPU: number of (fake) devices per process; 0 keeps JAX's default
    init_timeout: int = 60              # s: every process must have joined by then
    heartbeat_timeout: int = 30         # s: a silent process is declared dead after this
    shutdown_timeout: int = 30          # s: wait for the others at exit
    collective_timeout: int = 0         # s: CPU collectives give up after this (0: XLA's default)

    @property
    def multi_process(self) -> bool:
        return self.coordinator is not None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The multi-process flags of ``scripts/train.py`` (each defaults to its FUNDL_* variable)."""
    g = parser.add_argument_group("multi-process (see docs/parallel.md; scripts/launch_local.py sets these)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help=f"process 0's address [{ENV['coordinator']}]")
    g.add_argument("--num-processes", type=int, metavar="N", help=f"processes in the run [{ENV['num_processes']}]")
    g.add_argument("--process-id", type=int, metavar="I", help=f"this process, 0..N-1 [{ENV['process_id']}]")
    g.add_argument("--local-devices", type=int, metavar="D",
                   help=f"CPU only: fake devices per process, e.g. to try pmap on a laptop [{ENV['local_devices']}]")
    g.add_argument("--init-timeout", type=int, metavar="S",
                   help=f"seconds to wait for all processes at start-up (default {Settings.init_timeout}) "
                        f"[{ENV['init_timeout']}]")
    g.add_argument("--heartbeat-timeout", type=int, metavar="S",
                   help=f"seconds without heartbeats before a process counts as dead and the others stop "
                        f"(default {Settings.heartbeat_timeout}) [{ENV['heartbeat_timeout']}]")
    g.add_argument("--shutdown-timeout", type=int, metavar="S",
                   help=f"seconds to wait for the others at exit (default {Settings.shutdown_timeout}) "
                        f"[{ENV['shutdown_timeout']}]")
    g.add_argument("--collective-timeout", type=int, metavar="S",
                   help=f"CPU: seconds before a stuck collective fails (default: XLA's) [{ENV['collective_timeout']}]")


def settings_from(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags first, then the environment, then the defaults; checked for consistency."""
    environ = os.environ if environ is None else environ
    values = {}
    for name, var in ENV.items():
        value = getattr(args, name, None) if args is not None else None
        if value is None and environ.get(var, "") != "":
            raw = environ[var]
            if name == "coordinator":
                value = raw
            else:
                try:
                    value = int(raw)
                except ValueError:
                    raise DistributedError(f"{var}={raw!r} must be an integer") from None
        if value is not None:
            values[name] = value
    s = Settings(**values)
    if s.coordinator is None:
        if s.num_processes != 1 or s.process_id != 0:
            raise DistributedError(
                f"num_processes={s.num_processes}, process_id={s.process_id} need a coordinator: pass "
                f"--coordinator HOST:PORT (or {ENV['coordinator']}); scripts/launch_local.py does it for you")
        return s
    host, _, port = s.coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"coordinator must be HOST:PORT, got {s.coordinator!r}")
    if s.num_processes < 1 or not 0 <= s.process_id < s.num_processes:
        raise DistributedError(
            f"expected num_processes >= 1 and 0 <= process_id < num_processes, got "
            f"num_processes={s.num_processes}, process_id={s.process_id}")
    for name in ("init_timeout", "heartbeat_timeout", "shutdown_timeout"):
        if getattr(s, name) < 1:
            raise DistributedError(f"{name} must be at least 1 second, got {getattr(s, name)}")
    return s


def initialize(settings: Settings) -> Settings:
    """Set the device count and join the run; call before anything touches JAX devices."""
    if settings.collective_timeout:
        flag = f"--xla_cpu_collective_timeout_seconds={settings.collective_timeout}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    import jax

    if settings.local_devices:
        jax.config.update("jax_num_cpu_devices", settings.local_devices)
    if not settings.multi_process:
        return settings
    t0 = time.monotonic()
    # JAX's own start-up timeout ends in a C++ abort a few seconds after
    # init_timeout; this watchdog says what happened in plain words first.
    watchdog = threading.Timer(settings.init_timeout + 0.5, _start_up_timed_out, args=(settings,))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            # Process 0 listens on the coordinator address only (by default JAX
            # binds every interface): 127.0.0.1 stays on loopback.
            coordinator_bind_address=settings.coordinator,
            initialization_timeout=settings.init_timeout,
            heartbeat_timeout_seconds=settings.heartbeat_timeout,
            shutdown_timeout_seconds=settings.shutdown_timeout,
        )
    except Exception as e:  # noqa: BLE001 - re-raised with what to check
        raise DistributedError(
            f"process {settings.process_id} of {settings.num_processes} could not join the run at "
            f"{settings.coordinator} within {time.monotonic() - t0:.0f} s (init_timeout="
            f"{settings.init_timeout} s): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            f"Check that all {settings.num_processes} processes were started with the same coordinator "
            f"and distinct process ids, and that process 0 is running.") from e
    finally:
        watchdog.cancel()
    _install_exit_hook(settings)
    return settings


def _start_up_timed_out(settings: Settings) -> None:
    print(f"fundl: process {settings.process_id} of {settings.num_processes}: not all processes joined the run "
          f"at {settings.coordinator} within init_timeout={settings.init_timeout} s - a peer never started, "
          f"crashed at start-up or uses another coordinator address; exiting", file=sys.stderr, flush=True)
    os._exit(1)


def _install_exit_hook(settings: Settings) -> None:
    """In a multi-process run an uncaught error prints a clear line and exits at once.

    A peer failure gets one line (its traceback says nothing useful; set
    FUNDL_TRACEBACK=1 to see it anyway); any other error keeps its traceback.
    """
    previous = sys.excepthook
    who = f"process {settings.process_id} of {settings.num_processes}"

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt):
            print(f"fundl: {who} interrupted", file=sys.stderr, flush=True)
            os._exit(130)
        text = str(exc).splitlines()[0] if str(exc) else ""
        text = text.replace("Error dispatching computation: ", "")
        peer = _is_peer_failure(exc_type, text)
        if not peer or os.environ.get("FUNDL_TRACEBACK"):
            previous(exc_type, exc, tb)
        if peer:
            msg = (f"fundl: {who}: a peer process failed, disconnected or stopped responding during a "
                   f"collective ({exc_type.__name__}: {text[:300]}); stopping this process too")
        else:
            msg = f"fundl: {who} failed: {exc_type.__name__}: {text[:500]}"
        print(msg, file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Skip the runtime's shutdown barrier, which a dead peer never reaches.
        os._exit(1)

    sys.excepthook = hook


def _is_peer_failure(exc_type, text: str) -> bool:
    """Errors of the runtime or the CPU collectives that mean a peer is gone or stuck.

    (A gloo timeout surfaces as ``ValueError``, a closed connection as
    ``JaxRuntimeError``: look at the text, not only the type.)"""
    markers = ("Gloo", "gloo", "Connection reset", "Connection closed", "heartbeat", "UNAVAILABLE",
               "DEADLINE_EXCEEDED", "coordination service", "Timed out waiting")
    return any(m in text for m in markers)


def describe() -> str:
    """One line about this process's place in the run (after :func:`initialize`)."""
    import jax

    return (f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} local / "
            f"{jax.device_count()} global {jax.devices()[0].platform} devices")


# ------------------------------------------------------------ agreement
def process_zero_error(message: str | None, *, limit: int = 4096) -> str | None:
    """Process 0's error message (None: no error), the same on every process.

    Process 0 alone decides some things (it claims the run directory); the
    others learn its verdict here, through JAX's runtime, so that every
    process stops with the same message instead of the others waiting at the
    first collective.  With one process this returns ``message``.
    """
    import jax

    if jax.process_count() == 1:
        return message
    import numpy as np
    from jax.experimental import multihost_utils

    raw = (message or "").encode()[:limit - 1]
    buf = np.zeros(limit, np.uint8)
    buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    buf[-1] = message is not None
    got = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(got[:-1]).rstrip(b"\0").decode(errors="replace") if got[-1] else None


def gather_ints(value: int) -> list[int]:
    """``value`` of every process, in process order (``[value]`` with one process)."""
    import jax

    if jax.process_count() == 1:
        return [int(value)]
    import numpy as np
    from jax.experimental import multihost_utils

    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.asarray(value, np.int32))).reshape(-1)]
