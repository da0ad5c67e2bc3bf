"""Cluster launchers detected by JAX: SLURM (srun), Open MPI (mpirun), precedence and refusals.

``fundl.run.distributed.settings_from`` asks JAX's own cluster detectors
(``jax._src.clusters``) for the coordinator, the number of processes and the
process id when flags and FUNDL_* variables do not give them.  Here:

* unit tests from fake environments: what each JAX detector reads and gives,
  flags > FUNDL_* variables > detection, and the refusal of a launcher that
  started several processes when no run can be formed;
* the environment ``srun`` gives two tasks on one node (SLURM_STEP_NODELIST
  = localhost, the port JAX derives from SLURM_JOB_ID) on two worker
  processes, equal to one device within 1e-5;
* a real ``mpirun -np 2`` (Debian's openmpi-bin; skipped without
  ``mpirun``) of the same worker, and of ``scripts/train.py --local-devices
  2``, equal to one device.

Only loopback addresses: the tests watch every listening socket of the
processes they start (``/proc/PID/net/tcp*``) and check that JAX's
coordinator and the processes' other sockets are on loopback.  Open MPI 4's
``mpirun`` itself listens on every interface whatever ``oob_tcp_if_include``
says (its out-of-band channel binds INADDR_ANY and only *advertises* the
included interfaces), so where ``unshare --net`` works (root), mpirun runs in
a private network namespace that has nothing but ``lo``.  Every process
started here is waited for or killed (mpirun by its process group).
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from test_multihost import TIMEOUTS, finish, start
from test_parallel import KINDS, WORKER, assert_same_training, clean_env, section, shared_run

from fundl.run import distributed, launch_local
from conftest import ROOT

# One xdist worker runs this file and its siblings that share test_parallel.shared_run's reference runs
# (made once per process), so `make test` (--dist loadgroup) makes each once.
pytestmark = pytest.mark.xdist_group("parallel-reference")


TRAIN = ROOT / "scripts" / "train.py"
TINY = ROOT / "configs" / "tiny_synthetic.toml"
SLURM_PORT_BASE = 65535 - 2**12 + 1  # JAX's SlurmCluster/OmpiCluster: port = base + (job id % 4096)


def slurm_env(job_id: int, process_id: int, ntasks: int = 2, nodelist: str = "localhost") -> dict:
    """What srun gives task ``process_id`` of a ``ntasks``-task step on one node (the variables that matter)."""
    return {"SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id), "SLURM_STEP_ID": "0",
            "SLURM_STEP_NODELIST": nodelist, "SLURM_NODELIST": nodelist, "SLURM_JOB_NODELIST": nodelist,
            "SLURM_STEP_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
            "SLURM_NTASKS": str(ntasks), "SLURM_NPROCS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks),
            "SLURM_STEP_TASKS_PER_NODE": str(ntasks), "SLURM_PROCID": str(process_id),
            "SLURM_LOCALID": str(process_id)}


def ompi_env(rank: int, size: int = 2, uri: str = "1255735296.0;tcp://127.0.0.1:53469") -> dict:
    """What Open MPI 4's mpirun gives rank ``rank`` (as seen here from Debian's 4.1.4)."""
    return {"OMPI_MCA_orte_hnp_uri": uri, "OMPI_COMM_WORLD_SIZE": str(size), "OMPI_COMM_WORLD_RANK": str(rank),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_SIZE": str(size),
            "OMPI_MCA_orte_ess_num_procs": str(size), "PMIX_RANK": str(rank)}


def flags(*argv) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    distributed.add_arguments(p)
    return p.parse_args(list(argv))


# ------------------------------------------------------- JAX's detectors
def test_jax_detectors_are_what_the_docs_table_says():
    """The facts docs/parallel.md's detector table states, read from JAX itself (fails on a JAX that changed)."""
    from jax._src import clusters
    from jax._src.clusters import ompi_cluster, slurm_cluster

    order = [c.__name__ for c in clusters.ClusterEnv._cluster_types]
    assert order[:2] == ["OmpiCluster", "SlurmCluster"], order  # mpirun inside an allocation: Open MPI wins
    assert set(order) == set(distributed.LAUNCHERS), f"JAX's detectors changed: {order}"
    assert [c.__name__ for c in clusters.ClusterEnv._cluster_types if c.opt_in_only_method] == ["Mpi4pyCluster"]
    assert (slurm_cluster._JOBID_PARAM, slurm_cluster._NODE_LIST, slurm_cluster._PROCESS_COUNT,
            slurm_cluster._PROCESS_ID, slurm_cluster._LOCAL_PROCESS_ID) == distributed.SLURM_NEEDS
    assert ompi_cluster._ORTE_URI == "OMPI_MCA_orte_hnp_uri"
    assert (ompi_cluster._PROCESS_COUNT, ompi_cluster._PROCESS_ID) == ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")


def test_slurm_environment_forms_the_run():
    s = distributed.settings_from(None, slurm_env(1234, 1))
    assert (s.launcher, s.coordinator, s.num_processes, s.process_id) == ("slurm", "localhost:62674", 2, 1)
    assert 1234 % 4096 + SLURM_PORT_BASE == 62674 and s.bind_address is None  # localhost: bound as it is
    assert distributed.describe_launcher(s) == ("fundl: launcher slurm detected by JAX's SlurmCluster: "
                                                "process 1 of 2, coordinator localhost:62674")
    # JAX takes the first node of the step's list; a node name is bound on every interface, as JAX does
    s = distributed.settings_from(None, slurm_env(1234, 0, nodelist="gpu[007-010,012],login1"))
    assert (s.coordinator, s.bind_address) == ("gpu007:62674", "[::]:62674")
    s = distributed.settings_from(None, slurm_env(1234, 0, nodelist="10.1.2.3"))
    assert (s.coordinator, s.bind_address) == ("10.1.2.3:62674", None)  # an IP address: bound as it is
    # JAX_COORDINATOR_PORT overrides the port JAX derives (as in jax.distributed.initialize)
    s = distributed.settings_from(None, {**slurm_env(1234, 0), "JAX_COORDINATOR_PORT": "7001"})
    assert s.coordinator == "localhost:7001"


def test_openmpi_environment_forms_the_run():
    s = distributed.settings_from(None, ompi_env(1))
    port = 1255735296 // 2**12 % 2**12 + SLURM_PORT_BASE  # JAX: from the job id in OMPI_MCA_orte_hnp_uri
    assert (s.launcher, s.coordinator, s.num_processes, s.process_id) == ("openmpi", f"127.0.0.1:{port}", 2, 1)
    assert s.bind_address is None  # mpirun's own address: 127.0.0.1 stays on loopback
    # several interfaces: JAX takes the first address of the launcher's list
    s = distributed.settings_from(None, ompi_env(0, uri="1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"))
    assert s.coordinator.startswith("10.96.0.1:") and s.bind_address is None
    # mpirun inside a SLURM allocation: Open MPI's environment wins (JAX's order)
    s = distributed.settings_from(None, {**slurm_env(99, 0, ntasks=1), **ompi_env(1)})
    assert (s.launcher, s.num_processes, s.process_id) == ("openmpi", 2, 1)


def test_flags_beat_environment_beat_detection():
    env = slurm_env(1234, 1)
    s = distributed.settings_from(None, {**env, "FUNDL_PROCESS_ID": "0"})
    assert (s.launcher, s.process_id, s.num_processes, s.coordinator) == ("slurm", 0, 2, "localhost:62674")
    s = distributed.settings_from(flags("--process-id", "1"), {**env, "FUNDL_PROCESS_ID": "0"})
    assert s.process_id == 1
    s = distributed.settings_from(flags("--coordinator", "127.0.0.1:5555"), env)
    assert (s.coordinator, s.num_processes, s.process_id, s.bind_address) == ("127.0.0.1:5555", 2, 1, None)
    # all three given: JAX's detectors are not consulted (a broken launcher environment does not matter)
    given = {"FUNDL_COORDINATOR": "127.0.0.1:5555", "FUNDL_NUM_PROCESSES": "3", "FUNDL_PROCESS_ID": "2"}
    s = distributed.settings_from(None, {**ompi_env(0, uri="garbage"), **given})
    assert (s.launcher, s.coordinator, s.num_processes, s.process_id) == ("env", "127.0.0.1:5555", 3, 2)
    s = distributed.settings_from(flags("--num-processes", "3"), given)
    assert s.launcher == "flags"
    # --num-processes 1: this process alone, whatever the launcher says
    s = distributed.settings_from(flags("--num-processes", "1"), env)
    assert (s.multi_process, s.launcher) == (False, "flags")
    assert distributed.settings_from(None, {}).launcher == "none"


def test_a_launcher_with_one_process_is_a_single_process_run():
    s = distributed.settings_from(None, slurm_env(1234, 0, ntasks=1))
    assert (s.multi_process, s.launcher, s.num_processes) == (False, "slurm", 1)
    assert "1 process, a single-process run" in distributed.describe_launcher(s)


def _without(env: dict, *names) -> dict:
    return {k: v for k, v in env.items() if k not in names}


@pytest.mark.parametrize("env,match", [
    # sbatch's script or an salloc shell: SLURM_NTASKS=2 but no srun step
    (_without(slurm_env(1, 0), "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_ID"),
     "SLURM reports 2 tasks .*SLURM_STEP_NODELIST is missing \\(not inside an srun step"),
    (_without(slurm_env(1, 1), "SLURM_LOCALID"), "SLURM_LOCALID is missing"),
    # Open MPI 5 no longer sets OMPI_MCA_orte_hnp_uri
    (_without(ompi_env(1), "OMPI_MCA_orte_hnp_uri"), "Open MPI started 2 processes .*OMPI_MCA_orte_hnp_uri"),
    ({"PMI_SIZE": "4", "PMI_RANK": "1"}, "PMI_SIZE=4, e.g. MPICH"),
    pytest.param({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "1"},
                 "pod 1 of a Kubernetes indexed Job", marks=pytest.mark.skipif(
                     importlib.util.find_spec("kubernetes") is not None,
                     reason="with the kubernetes package JAX's K8sCluster tries the (absent) cluster API")),
    # a detector that fails while the launcher says there are 2 processes
    (ompi_env(1, uri="garbage"), "JAX's OmpiCluster detected openmpi but could not form a run"),
], ids=["sbatch-script", "partial-srun", "openmpi5", "mpich", "k8s", "bad-uri"])
def test_several_processes_but_no_run_is_refused(env, match):
    with pytest.raises(distributed.DistributedError, match=match) as e:
        distributed.settings_from(None, env)
    assert "--num-processes 1 to train in this one process" in str(e.value)
    # the way out the message names
    assert not distributed.settings_from(flags("--num-processes", "1"), env).multi_process


def test_a_failing_detector_with_no_sign_of_peers_trains_alone(capsys):
    s = distributed.settings_from(None, ompi_env(0, size=1, uri="garbage"))
    assert (s.multi_process, s.launcher) == (False, "none")
    assert "could not form a run" in capsys.readouterr().err
    # a Kubernetes pod without the kubernetes package (JAX's K8sCluster is then absent): no warning, one process
    s = distributed.settings_from(None, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert (s.multi_process, s.launcher) == (False, "none")


def test_train_script_refuses_a_partial_launcher_environment(tmp_path):
    env = clean_env(**_without(slurm_env(1, 0), "SLURM_STEP_NODELIST"))
    r = subprocess.run([sys.executable, str(TRAIN), "--config", str(TINY), "--run-dir", str(tmp_path / "run")],
                       env=env, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "error: SLURM reports 2 tasks" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------ listening sockets
def descendants(roots) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    out, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += children.get(pid, [])
    return out


def _sockets(pids) -> dict[int, tuple[set[str], str, str]]:
    """pid -> (inodes of its sockets, its command, its network namespace) for those of ``pids`` still alive."""
    held = {}
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            held[pid] = ({link[8:-1] for link in links if link.startswith("socket:[")},
                         Path(f"/proc/{pid}/comm").read_text().strip(), os.readlink(f"/proc/{pid}/ns/net"))
        except OSError:  # ended meanwhile
            continue
    return held


def _listening(held: dict[int, tuple[set[str], str, str]]) -> set[tuple[str, int, str]]:
    """(address, port, command) of the TCP sockets in LISTEN state among ``held`` (``_sockets``; any
    network namespace).  Each namespace's tables are read once: reading them is what costs."""
    found = set()
    for ns in {n for _, _, n in held.values()}:
        members = [(inodes, comm) for inodes, comm, n in held.values() if n == ns]
        for pid in (pid for pid, (_, _, n) in held.items() if n == ns):
            try:
                tables = [Path(f"/proc/{pid}/net/{t}").read_text().splitlines()[1:] for t in ("tcp", "tcp6")]
                break
            except OSError:  # ended meanwhile: another process of this namespace
                continue
        else:
            continue
        for line in (row for table in tables for row in table):
            f = line.split()
            if f[3] != "0A":  # LISTEN only
                continue
            for inodes, comm in members:
                if f[9] in inodes:  # held by this process
                    hexaddr, port = f[1].split(":")
                    raw = bytes.fromhex(hexaddr)
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order 32-bit words
                    found.add((str(ipaddress.ip_address(raw)), int(port, 16), comm))
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


class Listeners:
    """Collects every listening socket of ``procs`` and their children while the block runs."""

    def __init__(self, procs):
        self.roots, self.seen, self._stop = [p.pid for p in procs], set(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        """Every 0.1 s, the processes' sockets; the socket tables are read again when a socket is
        new, and at least every second (a socket made earlier may have started to listen)."""
        known, read_at = None, 0.0
        while not self._stop.is_set():
            held = _sockets(descendants(self.roots))
            inodes = {i for socks, _, _ in held.values() for i in socks}
            if inodes != known or time.monotonic() - read_at >= 1.0:
                self.seen |= _listening(held)
                known, read_at = inodes, time.monotonic()
            time.sleep(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def check(self, coordinator_port: int, exempt: tuple[str, ...] = ()) -> None:
        print("listening:", sorted(self.seen))
        coordinator = {a for a, port, _ in self.seen if port == coordinator_port}
        assert coordinator, f"nothing listened on the coordinator port {coordinator_port}: {sorted(self.seen)}"
        assert all(map(_loopback, coordinator)), f"coordinator not on loopback: {coordinator}"
        if not _hostname_is_loopback():  # gloo listens on what the host name resolves to (JAX gives it no choice)
            print(f"{socket.gethostname()} does not resolve to loopback: only the coordinator is checked")
            return
        other = {(a, port, c) for a, port, c in self.seen if not _loopback(a) and c not in exempt}
        assert not other, f"listening on non-loopback addresses: {sorted(other)}"


def _hostname_is_loopback() -> bool:
    try:
        return all(_loopback(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        return False


def _free_derived_port() -> int:
    """A SLURM job id whose derived coordinator port (JAX's rule) is free on 127.0.0.1."""
    for _ in range(200):
        job_id = random.randrange(10**5, 10**7)
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", job_id % 2**12 + SLURM_PORT_BASE))
            return job_id
        except OSError:
            continue
    pytest.skip("no free port in JAX's SLURM port range")


# ------------------------------------------------ the same training, launched
@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """test_parallel's reference run on one device (made once per pytest process)."""
    return shared_run("reference", tmp_path_factory)


@pytest.mark.slow
def test_srun_environment_two_processes_equal_one_device(one_device, tmp_path):
    """Two tasks of an srun step on one node (SLURM_STEP_NODELIST=localhost), 2 fake devices each,
    no FUNDL_* run variables: JAX's SlurmCluster forms the run (port from SLURM_JOB_ID)."""
    job_id = _free_derived_port()
    port = job_id % 2**12 + SLURM_PORT_BASE
    env = lambda i: clean_env(**slurm_env(job_id, i), FUNDL_LOCAL_DEVICES=2, **TIMEOUTS)
    procs = [start([sys.executable, str(WORKER), str(tmp_path / "mp.npz"), "sharding"], env(i)) for i in range(2)]
    with Listeners(procs) as listeners:
        outs = finish(procs)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert "worker done: process 1 of 2, 4 devices" in outs[1]
    listeners.check(port)
    mp = dict(np.load(tmp_path / "mp.npz"))
    for kind in KINDS:
        other = section(mp, f"sharding/{kind}/")
        assert int(other["num_devices"]) == 4
        assert_same_training(section(one_device, f"none/{kind}/"), other, f"srun 2 tasks x 2 devices, {kind}")


# ---------------------------------------------------------------- mpirun
def _private_network() -> bool:
    """Whether mpirun can run in a network namespace of its own (only ``lo``): needs unshare, ip, root."""
    if not (shutil.which("unshare") and shutil.which("ip")) or not _hostname_is_loopback():
        return False
    r = subprocess.run(["unshare", "--net", "ip", "link", "set", "lo", "up"], check=False, capture_output=True, timeout=30)
    return r.returncode == 0


def mpirun(n: int, argv: list[str], env: dict, private: bool) -> subprocess.Popen:
    cmd = ["mpirun", "-np", str(n), "--oversubscribe", "--bind-to", "none",
           "--mca", "oob_tcp_if_include", "lo", "--mca", "btl_tcp_if_include", "lo", *argv]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    if private:
        cmd = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, cwd=ROOT, start_new_session=True)


def finish_group(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    """Wait for ``proc``; on a timeout or an error, kill its whole process group (mpirun and its ranks)."""
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None,
                                  reason="mpirun not on PATH (Debian: apt-get install openmpi-bin)")


@pytest.fixture(scope="module")
def private_network():
    private = _private_network()
    if not private:
        print("no private network namespace: mpirun's own out-of-band listener binds every interface here")
    return private


@pytest.mark.slow
@needs_mpirun
def test_mpirun_two_processes_equal_one_device(one_device, tmp_path, private_network):
    """mpirun -np 2, 2 fake devices each, pmap across processes; JAX_COORDINATOR_PORT picks the port."""
    port = launch_local.free_port()
    env = clean_env(FUNDL_LOCAL_DEVICES=2, JAX_COORDINATOR_PORT=port, **TIMEOUTS)
    proc = mpirun(2, [sys.executable, str(WORKER), str(tmp_path / "mp.npz"), "pmap"], env, private_network)
    with Listeners([proc]) as listeners:
        out, err = finish_group(proc)
    assert proc.returncode == 0, (out + err)[-4000:]
    assert "worker done: process 0 of 2, 4 devices" in out and "worker done: process 1 of 2, 4 devices" in out
    # mpirun's own listener: inside its private network namespace (only lo), or Open MPI 4's INADDR_ANY
    listeners.check(port, exempt=("mpirun",))
    mp = dict(np.load(tmp_path / "mp.npz"))
    for kind in KINDS:
        other = section(mp, f"pmap/{kind}/")
        assert int(other["num_devices"]) == 4
        assert_same_training(section(one_device, f"none/{kind}/"), other, f"mpirun 2 x 2 devices, {kind}")


def _train_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@needs_mpirun
def test_mpirun_train_script_writes_once_and_equals_one_device(tmp_path, private_network):
    """The user's command: mpirun -np 2 python scripts/train.py ... --local-devices 2 --run-dir D.
    One run of 2 processes x 2 devices (not two trainings racing into D), equal to one device."""
    from fundl.run import config as cfg
    from fundl.run import experiment

    args = ["--config", str(TINY), "--quiet", "--set", "logging.plots=false", "--set", "training.checkpoint_every=0"]
    # one device, the same config: the reference, trained in this process
    experiment.run(cfg.load_config(TINY, ["logging.plots=false", "training.checkpoint_every=0"]), tmp_path / "one",
                   verbose=False)
    proc = mpirun(2, [sys.executable, str(TRAIN), *args, "--set", 'parallel.mode="sharding"', "--local-devices", "2",
                      "--init-timeout", "20", "--run-dir", str(tmp_path / "mp")], clean_env(), private_network)
    out, err = finish_group(proc)
    assert proc.returncode == 0, (out + err)[-4000:]
    lines = [line for line in err.splitlines() if line.startswith("fundl: launcher")]
    assert len(lines) == 1 and lines[0].startswith(  # process 0 alone says how the run was formed
        "fundl: launcher openmpi detected by JAX's OmpiCluster: process 0 of 2, coordinator 127.0.0.1:"), err[-3000:]
    summary = json.loads((tmp_path / "mp" / "summary.json").read_text())
    assert (summary["processes"], summary["devices"]) == (2, 4)
    ref = json.loads((tmp_path / "one" / "summary.json").read_text())
    mine, theirs = _train_records(tmp_path / "mp"), _train_records(tmp_path / "one")
    assert [(r["step"], r["split"]) for r in mine] == [(r["step"], r["split"]) for r in theirs]  # one writer
    np.testing.assert_allclose([r["loss"] for r in mine], [r["loss"] for r in theirs], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(summary["test_loss"], ref["test_loss"], rtol=1e-5)
    assert summary["test_accuracy"] == ref["test_accuracy"]
