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

Cluster launchers are detected by JAX's own detectors
(``jax._src.clusters``, the code behind a bare
``jax.distributed.initialize()``): when the coordinator, the number of
processes or the process id is not given by a flag or a FUNDL_* variable,
:func:`settings_from` asks the first detector whose environment is present,
in JAX's order (Open MPI's ``mpirun``: ``OMPI_MCA_orte_hnp_uri``; SLURM's
``srun``: ``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``,
``SLURM_PROCID``, ``SLURM_LOCALID``; Cloud TPU VMs; a Kubernetes indexed
Job with the ``kubernetes`` package), for the missing values, as
``jax.distributed.initialize`` would (``JAX_COORDINATOR_PORT`` overrides the
port it derives; ``JAX_COORDINATOR_ADDRESS`` is not read: use
``--coordinator``).  Flags beat FUNDL_* variables, which beat detection, value
by value; ``--num-processes 1`` trains in this one process whatever a
launcher says.  ``Settings.launcher`` records where the run came from
(``"none"``, ``"flags"``, ``"env"``, ``"slurm"``, ``"openmpi"``, ...); a
detected launcher that started one process gives a single-process run.  If
a launcher says it started several processes (``OMPI_COMM_WORLD_SIZE``,
``SLURM_NTASKS``, ``PMI_SIZE`` > 1) but no run can be formed (a partial
SLURM environment, Open MPI 5, which no longer sets
``OMPI_MCA_orte_hnp_uri``, MPICH), :func:`settings_from` raises
:class:`DistributedError` saying what is missing, instead of letting every
process train alone into the same run directory.  Process 0 binds the
coordinator address itself when it is an IP address or ``localhost``
(127.0.0.1 stays on loopback); a detected host name (a SLURM node, a
Kubernetes service) is bound on every interface, as JAX does, since a node's
own name may resolve to a loopback address on that node.

Nothing here touches a JAX device before :func:`initialize` (which must
come first: JAX refuses to join a run once its backend has started).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import os
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

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
RUN = ("coordinator", "num_processes", "process_id")  # what forms the run: given, or detected

# JAX's cluster detectors (jax._src.clusters), by class name, and fundl's name for each launcher.
LAUNCHERS = {"OmpiCluster": "openmpi", "SlurmCluster": "slurm", "Mpi4pyCluster": "mpi4py",
             "GkeTpuCluster": "gke-tpu", "GceTpuCluster": "gce-tpu", "K8sCluster": "kubernetes",
             "BaseTpuCluster": "tpu"}  # (the TPU detectors' base: never present itself)
# What JAX's SlurmCluster.is_env_present needs (tests/test_launchers.py checks this against JAX).
SLURM_NEEDS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


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
    launcher: str = "none"              # where the run came from: "none" (one process), "flags", "env",
    #                                     or a launcher JAX detected: "slurm", "openmpi", "kubernetes", ...
    bind_address: str | None = None     # where process 0 listens; None: the coordinator address itself

    @property
    def multi_process(self) -> bool:
        return self.coordinator is not None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The multi-process flags of ``scripts/train.py`` (each defaults to its FUNDL_* variable)."""
    g = parser.add_argument_group(
        "multi-process (see docs/parallel.md)",
        "Started by srun (SLURM), mpirun (Open MPI 4) or a Kubernetes indexed Job, the\n"
        "processes form one run by JAX's cluster detection: no flags needed. These flags\n"
        "(or their FUNDL_* variables, which scripts/launch_local.py sets) override what\n"
        "is detected, value by value.")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help=f"process 0's address (default: detected, or none: one process) [{ENV['coordinator']}]")
    g.add_argument("--num-processes", type=int, metavar="N",
                   help=f"processes in the run (default: detected, or 1); 1 trains in this one process whatever "
                        f"a launcher says [{ENV['num_processes']}]")
    g.add_argument("--process-id", type=int, metavar="I",
                   help=f"this process, 0..N-1 (default: detected, or 0) [{ENV['process_id']}]")
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
    """Flags first, then the environment, then a launcher JAX detects, then the defaults; checked.

    ``environ`` (default ``os.environ``) is what the FUNDL_* variables and
    JAX's detectors read.
    """
    environ = os.environ if environ is None else environ
    values, source = {}, {}
    for name, var in ENV.items():
        value = getattr(args, name, None) if args is not None else None
        source[name] = "flags"
        if value is None and environ.get(var, "") != "":
            raw, source[name] = environ[var], "env"
            if name == "coordinator":
                value = raw
            else:
                try:
                    value = int(raw)
                except ValueError:
                    raise DistributedError(f"{var}={raw!r} must be an integer") from None
        if value is not None:
            values[name] = value
    explicit = {k: values[k] for k in RUN if k in values}
    launcher = "flags" if any(source[k] == "flags" for k in explicit) else "env" if explicit else "none"
    alone = explicit.get("num_processes") == 1 and "coordinator" not in explicit  # --num-processes 1
    detected_coordinator = False
    if len(explicit) < len(RUN) and not alone:
        found = _detect(environ, explicit, values.get("init_timeout", Settings.init_timeout))
        if found is not None:
            launcher, detected = found
            for k, v in detected.items():
                values.setdefault(k, v)  # explicit settings win
            detected_coordinator = "coordinator" not in explicit
            if detected_coordinator and values["num_processes"] == 1:
                del values["coordinator"]  # a launcher that started one process: a single-process run
    s = Settings(**values, launcher=launcher)
    if s.coordinator is None:
        problem = None if "num_processes" in explicit else _lone_process_problem(environ)
        if problem:
            raise DistributedError(problem)
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
    if detected_coordinator and not _binds_itself(host):
        s = dataclasses.replace(s, bind_address=f"[::]:{port}")
    return s


def _binds_itself(host: str) -> bool:
    """An address process 0 can listen on as it is: an IP address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def _environment(environ: Mapping[str, str]):
    """JAX's detectors read ``os.environ``: let them read ``environ`` for the duration."""
    if environ is os.environ:
        yield
        return
    from unittest import mock

    with mock.patch.object(os, "environ", dict(environ)):
        yield


def _detect(environ: Mapping[str, str], explicit: dict, timeout: int) -> tuple[str, dict] | None:
    """(launcher, {coordinator, num_processes, process_id}) from JAX's cluster detection, or None.

    The first of JAX's detectors whose environment is present (JAX's order;
    opt-in ones such as mpi4py are skipped, as in a bare
    ``jax.distributed.initialize()``) fills the values not in ``explicit``.
    """
    try:
        import jax  # noqa: F401 - first, outside the swapped environment: JAX reads its config at import
        from jax._src import clusters
    except ImportError:  # a JAX without this module: no detection (_lone_process_problem still guards)
        return None
    env = None
    with _environment(environ), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # K8sCluster's "install jax[k8s]", in every pod; we say it when it matters
        try:
            env = next((c for c in clusters.ClusterEnv._cluster_types
                        if not c.opt_in_only_method and c.is_env_present()), None)
            if env is None:
                return None
            coordinator, num, pid, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
                coordinator_address=explicit.get("coordinator"), num_processes=explicit.get("num_processes"),
                process_id=explicit.get("process_id"), local_device_ids=None, cluster_detection_method=None,
                initialization_timeout=timeout)
        except Exception as e:  # said in our words, with JAX's reason
            who = f"JAX's {env.__name__} detected {LAUNCHERS.get(env.__name__, env.__name__)} but" if env else \
                "JAX's cluster detection"
            why = f"{who} could not form a run: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if "num_processes" in explicit or _lone_process_problem(environ):
                raise DistributedError(f"{why}. {_FIX}") from e
            # nothing says there are other processes (a Kubernetes pod outside a Job, say): train alone
            print(f"fundl: {why}; training in this one process", file=sys.stderr, flush=True)
            return None
    launcher = LAUNCHERS.get(env.__name__, env.name or env.__name__)
    return launcher, {"coordinator": coordinator, "num_processes": int(num), "process_id": int(pid)}


def _int(environ: Mapping[str, str], var: str) -> int:
    try:
        return int(environ.get(var, "") or 0)
    except ValueError:
        return 0


_FIX = ("Start the processes with a launcher JAX detects (see docs/parallel.md, 'Cluster launchers'), "
        "pass --coordinator HOST:PORT --num-processes N --process-id I (or the FUNDL_* variables), or "
        "--num-processes 1 to train in this one process.")


def _lone_process_problem(environ: Mapping[str, str]) -> str | None:
    """With no run formed: why this process must not train alone, if a launcher says it started several.

    (Each process would otherwise train alone on the whole data set, into
    the same run directory.)  None if nothing says so."""
    n = _int(environ, "OMPI_COMM_WORLD_SIZE")
    if n > 1:
        return (
            f"Open MPI started {n} processes (OMPI_COMM_WORLD_SIZE={n}), but JAX's OmpiCluster detector needs "
            f"OMPI_MCA_orte_hnp_uri, which is not set (Open MPI 5 no longer sets it), so no multi-process run "
            f"could be formed and each process would train alone. {_FIX} Under mpirun, process I is "
            f"$OMPI_COMM_WORLD_RANK.")
    n = max(_int(environ, "SLURM_STEP_NUM_TASKS"), _int(environ, "SLURM_NTASKS"))
    if n > 1:
        missing = [v for v in SLURM_NEEDS if v not in environ]
        where = (" (not inside an srun step? sbatch and salloc run their script or shell as one process)"
                 if "SLURM_STEP_NODELIST" in missing else "")
        lacks = f"; {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing{where}" if missing else ""
        return (
            f"SLURM reports {n} tasks (SLURM_NTASKS={environ.get('SLURM_NTASKS')}), but JAX's SlurmCluster "
            f"detector needs {', '.join(SLURM_NEEDS)}{lacks}: no multi-process run could be formed and each "
            f"process would train alone. {_FIX}")
    n = _int(environ, "PMI_SIZE")
    if n > 1:
        return (
            f"an MPI launcher started {n} processes (PMI_SIZE={n}, e.g. MPICH or Intel MPI), which JAX does "
            f"not detect on its own, so no multi-process run could be formed and each process would train "
            f"alone. {_FIX} Process I is $PMI_RANK.")
    if "KUBERNETES_SERVICE_HOST" in environ and _int(environ, "JOB_COMPLETION_INDEX") > 0:
        return (
            f"this is pod {environ['JOB_COMPLETION_INDEX']} of a Kubernetes indexed Job, but JAX's K8sCluster "
            f"detector could not form the run (it needs the kubernetes package: pip install 'jax[k8s]', and a "
            f"service account that may read pods and jobs), so this pod would train alone. {_FIX}")
    return None


def describe_launcher(settings: Settings) -> str | None:
    """One line on how this run was formed (None for a plain single-process run)."""
    if settings.launcher == "none":
        return None
    how = {"flags": "set by --coordinator/--num-processes/--process-id",
           "env": "set by FUNDL_* variables"}.get(settings.launcher)
    if how is None:
        cls = {v: k for k, v in LAUNCHERS.items()}.get(settings.launcher, settings.launcher)
        how = f"launcher {settings.launcher} detected by JAX's {cls}"
    if not settings.multi_process:
        return f"fundl: {how}: 1 process, a single-process run"
    bind = f", listening on {settings.bind_address}" if settings.bind_address and settings.process_id == 0 else ""
    return (f"fundl: {how}: process {settings.process_id} of {settings.num_processes}, "
            f"coordinator {settings.coordinator}{bind}")


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
            # binds every interface): 127.0.0.1 stays on loopback.  (A detected
            # host name is bound on every interface: see settings_from.)
            coordinator_bind_address=settings.bind_address or settings.coordinator,
            initialization_timeout=settings.init_timeout,
            heartbeat_timeout_seconds=settings.heartbeat_timeout,
            shutdown_timeout_seconds=settings.shutdown_timeout,
        )
    except Exception as e:  # re-raised with what to check
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
