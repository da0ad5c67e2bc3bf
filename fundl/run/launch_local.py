"""Start N training processes on this machine (127.0.0.1) as one multi-process JAX run.

    python scripts/launch_local.py -n 2 --local-devices 2 -- \\
        --config configs/tiny_synthetic.toml --set parallel.mode='"sharding"' --run-dir runs/mp

Everything after ``--`` goes to ``scripts/train.py`` (or to ``--script``).
Each process gets ``FUNDL_COORDINATOR=127.0.0.1:PORT`` (a free port unless
``--port``), ``FUNDL_NUM_PROCESSES``, ``FUNDL_PROCESS_ID`` and the timeouts
as environment variables (see ``fundl/run/distributed.py``); its output lines
are prefixed with ``[pI]``.  Process 0 writes the run directory.

If a process fails, the others are given ``--grace`` seconds to stop by
themselves (JAX's runtime or the collectives notice the dead peer) and are
then killed; the launcher prints how each process ended and exits with the
first non-zero code.  Exit codes of the processes: 0 done, 1 an error
(message on its stderr), -6 SIGABRT (usually JAX's distributed runtime
terminating the process after a peer died), -9 killed.  Installed, this is
``fundl-launch-local``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is fundl/run/launch_local.py)
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code == 0:
        return "finished (exit 0)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = {"SIGABRT": " - aborted, usually JAX's distributed runtime stopping it after a peer failed",
               "SIGKILL": " - killed", "SIGTERM": " - terminated"}.get(name, "")
        return f"ended by {name}{why}"
    return f"failed (exit {code})"


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix}{line}")
        out.flush()
    stream.close()


def launch(num_processes: int, train_args: list[str], *, local_devices: int = 0, port: int = 0,
           init_timeout: int | None = None, heartbeat_timeout: int | None = None,
           shutdown_timeout: int | None = None, collective_timeout: int | None = None,
           grace: float | None = None, script: str | None = None, python: str = sys.executable,
           env: dict | None = None, only: list[int] | None = None) -> int:
    """Run the processes; return 0 if all succeeded, else the first failure's code (1 for signals)."""
    port = port or free_port()
    script = script or str(ROOT / "scripts" / "train.py")
    base = dict(os.environ if env is None else env)
    base.update({"FUNDL_COORDINATOR": f"{LOOPBACK}:{port}", "FUNDL_NUM_PROCESSES": str(num_processes),
                 "PYTHONUNBUFFERED": "1"})
    for name, value in (("FUNDL_LOCAL_DEVICES", local_devices or None), ("FUNDL_INIT_TIMEOUT", init_timeout),
                        ("FUNDL_HEARTBEAT_TIMEOUT", heartbeat_timeout), ("FUNDL_SHUTDOWN_TIMEOUT", shutdown_timeout),
                        ("FUNDL_COLLECTIVE_TIMEOUT", collective_timeout)):
        if value is not None:
            base[name] = str(value)
    if grace is None:
        grace = int(base.get("FUNDL_HEARTBEAT_TIMEOUT", 30)) + int(base.get("FUNDL_INIT_TIMEOUT", 60)) // 2 + 15
    procs, pumps = {}, []
    print(f"launch_local: {num_processes} processes, coordinator {LOOPBACK}:{port}", file=sys.stderr, flush=True)
    for i in range(num_processes):
        if only is not None and i not in only:  # for tests: leave a peer out on purpose
            continue
        proc = subprocess.Popen([python, script, *train_args], env={**base, "FUNDL_PROCESS_ID": str(i)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=os.getcwd())
        procs[i] = proc
        t = threading.Thread(target=_pump, args=(proc.stdout, f"[p{i}] ", sys.stdout), daemon=True)
        t.start()
        pumps.append(t)
    t0 = time.monotonic()
    first_failure: tuple[int, float] | None = None
    ended: dict[int, float] = {}
    try:
        while len(ended) < len(procs):
            for i, proc in procs.items():
                if i not in ended and proc.poll() is not None:
                    ended[i] = time.monotonic() - t0
                    if proc.returncode != 0 and first_failure is None:
                        first_failure = (i, time.monotonic())
                        print(f"launch_local: process {i} {describe_exit(proc.returncode)} after {ended[i]:.1f} s; "
                              f"waiting up to {grace:.0f} s for the others to stop", file=sys.stderr, flush=True)
            if first_failure and time.monotonic() - first_failure[1] > grace:
                for i, proc in procs.items():
                    if proc.poll() is None:
                        print(f"launch_local: process {i} still running {grace:.0f} s after process "
                              f"{first_failure[0]} failed; killing it", file=sys.stderr, flush=True)
                        proc.kill()
                first_failure = (first_failure[0], float("inf"))
            time.sleep(0.1)
    except KeyboardInterrupt:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs.values():
            proc.wait()
    for t in pumps:
        t.join(timeout=5)
    codes = {i: p.returncode for i, p in procs.items()}
    for i in sorted(codes):
        print(f"launch_local: process {i} {describe_exit(codes[i])} after {ended.get(i, time.monotonic() - t0):.1f} s",
              file=sys.stderr, flush=True)
    bad = [c for c in codes.values() if c != 0]
    return 0 if not bad else (bad[0] if bad[0] > 0 else 1)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    if "--" in argv:
        k = argv.index("--")
        argv, rest = argv[:k], argv[k + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--num-processes", type=int, default=2)
    p.add_argument("--local-devices", type=int, default=0, help="fake CPU devices per process (0: JAX's default)")
    p.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--init-timeout", type=int, help="seconds for all processes to join (default 60)")
    p.add_argument("--heartbeat-timeout", type=int, help="seconds before a silent process counts as dead (default 30)")
    p.add_argument("--shutdown-timeout", type=int, help="seconds to wait for the others at exit (default 30)")
    p.add_argument("--collective-timeout", type=int, help="CPU: seconds before a stuck collective fails")
    p.add_argument("--grace", type=float, help="seconds the others get to stop after one fails, before being killed")
    p.add_argument("--script", help="the script to run (default scripts/train.py)")
    args = p.parse_args(argv)
    if args.num_processes < 1:
        p.error("--num-processes must be >= 1")
    return launch(args.num_processes, rest, local_devices=args.local_devices, port=args.port,
                  init_timeout=args.init_timeout, heartbeat_timeout=args.heartbeat_timeout,
                  shutdown_timeout=args.shutdown_timeout, collective_timeout=args.collective_timeout,
                  grace=args.grace, script=args.script)

