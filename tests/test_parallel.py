"""Data parallelism on fake CPU devices: pmap and sharding equal one device.

Multi-device runs happen in subprocesses (the device count is fixed when JAX
starts; this pytest process keeps its single device for the other tests).
``tests/parallel_worker.py`` trains an MLP, a CNN with batch norm and an
LSTM for 20 SGD-momentum steps through ``fit`` on the same global batches
with each placement.

Tolerance: every float leaf of the final train state (params, batch-norm
running statistics, optimiser state) must satisfy
``max|a - b| <= RTOL * max|a|`` with RTOL = 1e-5: reductions ordered
differently per device count differ in the last bits (the measured
differences are in docs/parallel.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

# One xdist worker runs this file and its siblings that share test_parallel.shared_run's reference runs
# (made once per process), so `make test` (--dist loadgroup) makes each once.
pytestmark = pytest.mark.xdist_group("parallel-reference")

WORKER = ROOT / "tests" / "parallel_worker.py"
RTOL = 1e-5
KINDS = ("mlp", "cnn_bn", "lstm")


LAUNCHER_VARS = ("FUNDL_", "SLURM_", "OMPI_", "PMI_", "PMIX_", "JAX_COORDINATOR", "JOB_COMPLETION_INDEX",
                 "KUBERNETES_SERVICE")


def clean_env(**extra) -> dict:
    """This environment without fundl's settings or a launcher's (the tests may run under srun or mpirun)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS) and k != "XLA_FLAGS"}
    env.update({"PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu", **{k: str(v) for k, v in extra.items()}})
    return env


def run_worker(out: Path, specs: list[str], devices: int, timeout: float = 240) -> dict:
    proc = subprocess.run([sys.executable, str(WORKER), str(out), *specs], env=clean_env(FUNDL_LOCAL_DEVICES=devices),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dict(np.load(out))


def section(results: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}


def max_relative_error(ref: dict, other: dict) -> float:
    """max over float state leaves of max|a - b| / max|a|."""
    worst = 0.0
    states = [n for n in ref if n.startswith("state/")]
    assert states and set(states) <= set(other), "missing state leaves"
    for name in states:
        a, b = ref[name], other[name]
        assert a.shape == b.shape, name
        if a.dtype.kind != "f":
            np.testing.assert_array_equal(a, b, err_msg=name)  # step counter, PRNG key
            continue
        worst = max(worst, float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-12)))
    return worst


def assert_same_training(ref: dict, other: dict, label: str) -> float:
    err = max_relative_error(ref, other)
    print(f"{label}: max relative state error {err:.2e}")
    assert err <= RTOL, f"{label}: max relative state error {err:.2e} > {RTOL}"
    np.testing.assert_allclose(other["losses"], ref["losses"], rtol=1e-5, atol=1e-6, err_msg=label)
    np.testing.assert_allclose(other["eval"], ref["eval"], rtol=1e-5, atol=1e-6, err_msg=label)
    # evaluations inside fit (steps 10, 20) run on the state where fit holds it: no params from the host
    np.testing.assert_allclose(other["fit_eval"], ref["fit_eval"], rtol=1e-5, atol=1e-6, err_msg=label)
    np.testing.assert_allclose(other["fit_eval"][-1], other["eval"], rtol=1e-6, atol=1e-7, err_msg=label)
    assert int(other["eval_placed"]) == 0, f"{label}: evaluating placed {int(other['eval_placed'])} leaves from the host"
    return err


# The worker's runs, each made once per pytest process: a process of one device trains the
# reference of every comparison (for this file, test_fsdp, test_multihost and test_launchers);
# processes of four devices train this file's placements and test_fsdp.py's.
RUNS = {"reference": (["none", "none:0:1:mlp_dropout"], 1),
        "parallel": (["pmap", "sharding", "pmap:0:5:cnn_bn+lstm", "sharding:0:5:cnn_bn", "bn",
                      "sharding:0:1:mlp_dropout"], 4),
        "fsdp": (["fsdp", "fsdp:0:5:cnn_bn", "fsdp_tp:0:1:mlp+cnn_bn", "fsdp:0:1:mlp_dropout", "fsdp_memory"], 4)}
_DONE: dict[str, dict] = {}


def shared_run(name: str, tmp_path_factory) -> dict:
    """The results of the worker run ``name`` (a key of RUNS), made on first use in this process."""
    if name not in _DONE:
        specs, devices = RUNS[name]
        _DONE[name] = run_worker(tmp_path_factory.mktemp(name) / f"{name}.npz", specs, devices=devices)
    return _DONE[name]


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    """The reference (1 device) and this file's 4-device placements, in one dict (keys differ by spec)."""
    return {**shared_run("reference", tmp_path_factory), **shared_run("parallel", tmp_path_factory)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["pmap", "sharding"])
def test_four_devices_equal_one_device(four_devices, mode, kind):
    ref = section(four_devices, f"none/{kind}/")
    other = section(four_devices, f"{mode}/{kind}/")
    assert int(other["num_devices"]) == 4 and int(ref["num_devices"]) == 1
    assert ref["losses"].shape == (4,)  # 20 steps logged every 5
    assert ref["fit_eval"].shape == (2, 2)  # evaluated at steps 10 and 20
    assert int(other["fit_placed"]) > 0  # the count sees put_state's placements
    assert_same_training(ref, other, f"{mode} x4 vs 1 device, {kind}")


@pytest.mark.slow
@pytest.mark.parametrize("spec,kind", [("pmap:0:5:cnn_bn+lstm", "cnn_bn"), ("pmap:0:5:cnn_bn+lstm", "lstm"),
                                       ("sharding:0:5:cnn_bn", "cnn_bn")])
def test_fused_steps_on_four_devices(four_devices, spec, kind):
    """steps_per_call=5: batches (K, B, ...) arranged as (D, K, B/D, ...) for pmap, P(None, 'data') for sharding."""
    assert_same_training(section(four_devices, f"none/{kind}/"), section(four_devices, f"{spec}/{kind}/"),
                         f"{spec} vs 1 device, {kind}")


@pytest.mark.slow
def test_sharding_with_dropout_equals_one_device(four_devices):
    """The sharded step draws the global batch's dropout mask (partitionable threefry), so even
    dropout runs equal one device; pmap folds the device index into the key and differs on purpose."""
    assert_same_training(section(four_devices, "none:0:1:mlp_dropout/mlp_dropout/"),
                         section(four_devices, "sharding:0:1:mlp_dropout/mlp_dropout/"), "sharding x4, dropout")


@pytest.mark.slow
def test_pmapped_batch_norm_statistics_equal_global_batch(four_devices):
    bn = section(four_devices, "bn/")
    assert int(bn["num_devices"]) == 4
    np.testing.assert_allclose(bn["yp"], bn["y1"], rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(bn["meanp"], bn["mean1"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn["varp"], bn["var1"], rtol=1e-5, atol=1e-6)
    # every device holds the same (global) running statistics
    np.testing.assert_array_equal(bn["meanp_all"], np.broadcast_to(bn["meanp_all"][0], bn["meanp_all"].shape))


def train_cli(tmp_path, *args, devices=2, timeout=180):
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny_synthetic.toml"),
           "--quiet", "--local-devices", str(devices), "--set", "logging.plots=false", *args]
    return subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


@pytest.mark.slow
def test_cli_pmap_on_two_fake_devices(tmp_path):
    run_dir = tmp_path / "run"
    proc = train_cli(tmp_path, "--set", 'parallel.mode="pmap"', "--set", "training.steps_per_call=4",
                     "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["devices"] == 2 and summary["final_step"] == 24 and summary["processes"] == 1
    assert summary["test_accuracy"] is not None
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "eval"] == [12, 24]
    assert (run_dir / "checkpoints" / "step_00000024").is_dir()


# An indivisible global batch through the command line (exit 2, the sizes that divide, nothing
# trained): tests/test_errors.py, test_global_batch_not_divisible_in_the_cli_exits_2_before_training.


def test_divisibility_message_and_placement_errors_in_process():
    import jax

    from fundl.train import placement

    with pytest.raises(ValueError, match=r"global batch size 30 must be divisible by the number of devices 4.*28 or 32"):
        placement.local_batches_divisible(30, 4)
    one = placement.make_placement("none")  # one device is a 1-device mesh
    assert isinstance(one, placement.MeshPlacement) and one.num_devices == 1 and one.mesh.devices.size == 1
    with pytest.raises(ValueError, match="parallel.mode must be"):
        placement.make_placement("dp")
    with pytest.raises(ValueError, match=r"parallel.devices=9 but this process has 1 local device"):
        placement.make_placement("sharding", jax.local_device_count() + 8)


@pytest.mark.parametrize("mode", ["pmap", "sharding"])
def test_one_device_placements_round_trip_the_state(mode):
    """On the single device of this process: put/get keeps every leaf (typed keys included)."""
    import jax
    import optax

    from fundl import models
    from fundl.train.placement import make_placement
    from fundl.train.state import create_train_state

    placement = make_placement(mode)
    model = models.mlp([4], 3)
    state = create_train_state(model, optax.adam(1e-3), jax.random.key(1), (1, 5))
    back = placement.get_state(placement.put_state(state))
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert placement.num_devices == 1 and placement.sync_every >= 1


@pytest.mark.slow
def test_one_device_is_a_plain_jit_bit_for_bit():
    """parallel.mode='none' is a 1-device mesh: host batches go in as they are, and three steps
    give the bit-identical state and metrics of ``jax.jit(step, donate_argnums=0)``."""
    import jax
    import optax

    from fundl import models
    from fundl.train.placement import make_placement
    from fundl.train.state import create_train_state
    from fundl.train.step import make_train_step

    model, opt = models.cnn([4], [8], 3, batch_norm=True), optax.adam(1e-2)
    state = create_train_state(model, opt, jax.random.key(0), (1, 6, 6, 1))
    step = make_train_step(model, opt)
    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(size=(8, 6, 6, 1)).astype(np.float32), "y": rng.integers(0, 3, 8).astype(np.int32)}
               for _ in range(3)]
    placement = make_placement("none")
    fn, placed = placement.compile_train(step), placement.put_state(state)
    plain, ref = jax.jit(step, donate_argnums=0), jax.device_put(state, may_alias=False)
    for batch in batches:
        assert placement.put_batch(batch) is batch
        placed, metrics = fn(placed, placement.put_batch(batch))
        ref, ref_metrics = plain(ref, batch)
        assert placement.host_metrics(metrics) == jax.device_get(ref_metrics)
    got, want = placement.get_state(placed), ref
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert not any(x.is_deleted() for x in jax.tree.leaves(state) if isinstance(x, jax.Array))  # put_state copied
