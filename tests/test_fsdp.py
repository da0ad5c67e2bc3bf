"""parallel.mode = "fsdp": parameters and optimiser state split over the devices, equal to one device.

Multi-device runs happen in subprocesses with 4 fake CPU devices
(``tests/parallel_worker.py``, as ``tests/test_parallel.py``); the two-process
run (2 processes x 2 devices) is in ``tests/test_multihost.py``.  Tolerance as
there: every float leaf of the final train state within ``1e-5 * max|a|``
after 20 SGD-momentum steps (the measured differences are in docs/parallel.md).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from test_parallel import KINDS, assert_same_training, clean_env, section, shared_run

from conftest import ROOT

from fundl.run import config as cfg
from fundl.run import experiment
from fundl.run.build import placement_from_config
from fundl.train.placement import make_placement, state_bytes
from fundl.train.placement.rules import PartitionRules

# One xdist worker runs this file and its siblings that share test_parallel.shared_run's reference runs
# (made once per process), so `make test` (--dist loadgroup) makes each once.
pytestmark = pytest.mark.xdist_group("parallel-reference")

@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """The 1-device reference and the 4-device runs (fsdp, fused, fsdp_tp, dropout, fsdp_memory), each
    made once per pytest process (test_parallel.RUNS)."""
    return {**shared_run("reference", tmp_path_factory), **shared_run("fsdp", tmp_path_factory)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_fsdp_on_four_devices_equals_one_device(four, kind):
    other = section(four, f"fsdp/{kind}/")
    assert int(other["num_devices"]) == 4
    assert_same_training(section(four, f"none/{kind}/"), other, f"fsdp x4 vs 1 device, {kind}")
    specs = dict(line.split("=", 1) for line in other["specs"])
    split = [p for p, s in specs.items() if "data" in s]
    # parameters and their optimiser state (SGD momentum: 'trace') are split, counters and the key are not
    assert any(p.startswith("params/") for p in split) and any(p.startswith("opt_state/") for p in split), specs
    assert specs["step"] == "()" and specs["key"] == "()"


@pytest.mark.slow
def test_fused_steps_and_dropout_under_fsdp_equal_one_device(four):
    assert_same_training(section(four, "none/cnn_bn/"), section(four, "fsdp:0:5:cnn_bn/cnn_bn/"), "fsdp, 5 fused")
    assert_same_training(section(four, "none:0:1:mlp_dropout/mlp_dropout/"),
                         section(four, "fsdp:0:1:mlp_dropout/mlp_dropout/"), "fsdp x4, dropout")


@pytest.mark.slow
def test_partition_rules_on_a_data_by_model_mesh_equal_one_device(four):
    """2 x 2 data x model mesh; the MLP's first layer split by columns, the second by rows over
    'model' (rules), everything else by the automatic rule over 'data' (2 devices)."""
    for kind in ("mlp", "cnn_bn"):
        other = section(four, f"fsdp_tp:0:1:mlp+cnn_bn/{kind}/")
        assert_same_training(section(four, f"none/{kind}/"), other, f"fsdp 2x2 rules, {kind}")
    specs = dict(line.split("=", 1) for line in section(four, "fsdp_tp:0:1:mlp+cnn_bn/mlp/")["specs"])
    assert specs["params/dense_0/w"] == "(None, 'model')" and specs["params/dense_1/w"] == "('model', None)"
    assert specs["opt_state/0/trace/dense_0/w"] == "(None, 'model')"  # an unanchored rule covers the moments
    assert specs["params/dense_1/b"] == "('data',)"  # no rule: the automatic one, over 'data'


@pytest.mark.slow
def test_state_memory_per_device_is_a_quarter_of_replicated(four):
    """Bytes of the placed params + optimiser state on one device, and XLA's memory analysis of the
    compiled step (its arguments: the state and this device's slice of the batch)."""
    for kind in KINDS:
        per_device, total = section(four, f"fsdp/{kind}/")["state_bytes"]
        assert per_device / total < 0.3, (kind, per_device, total)  # 1/4 plus small replicated leaves
    m = section(four, "fsdp_memory/")
    rep, fsdp = int(m["sharding/argument_bytes"]), int(m["fsdp/argument_bytes"])
    batch = int(m["batch_bytes"])
    ratio = (fsdp - batch) / (rep - batch)
    print(f"XLA argument bytes per device: replicated {rep}, fsdp {fsdp} (state ratio {ratio:.3f})")
    assert 0.24 < ratio < 0.26, ratio
    per_device, total = m["fsdp/state_bytes"]
    assert per_device == fsdp - batch and total == rep - batch  # the two accounts agree


# ------------------------------------------------------------- the layout rules
def test_automatic_rule_splits_the_largest_divisible_dimension():
    p = PartitionRules({"data": 4}, split=True, min_size=1024)  # the rule alone, as on 4 data devices
    spec = lambda shape, floating=True: tuple(p.spec("params/w", shape, floating))
    assert spec((256, 512)) == (None, "data")       # the larger dimension
    assert spec((512, 512)) == ("data",)            # the first of equals
    assert spec((3, 3, 30, 64)) == (None, None, None, "data")  # 30 does not divide by 4
    assert spec((30, 35)) == ()                     # nothing divides: replicated
    assert spec((16,)) == ()                        # below min_size: replicated
    assert spec((4096,), floating=False) == ()      # integer leaves (counters, key data): replicated
    p = PartitionRules({"data": 4}, split=True, min_size=1024, members=3)
    assert spec((3, 256, 512)) == (None, None, "data")  # an ensemble's member axis is never split


def test_state_bytes_counts_shards_per_device():
    import jax
    import jax.numpy as jnp

    state = {"w": jnp.ones((8, 4)), "k": jax.random.key(0)}
    per_device, total = state_bytes(state)
    assert per_device == total == 8 * 4 * 4 + 8  # one device: everything, the key as its uint32 data


@pytest.mark.parametrize("override,match", [
    ('parallel.rules=[["dense", ["data"]]]', "apply to parallel.mode='fsdp'"),
    ('parallel.model_devices=2', "apply to parallel.mode='fsdp'"),
])
def test_fsdp_settings_without_fsdp_are_config_errors(override, match):
    config = cfg.load_config(ROOT / "configs" / "tiny_synthetic.toml", [override])
    with pytest.raises(cfg.ConfigError, match=match):
        placement_from_config(config)


@pytest.mark.parametrize("rules,match", [
    ([["dense_0/w", "data"]], r"must be \[REGEX, \[AXIS_OR_EMPTY"),
    ([["dense_(", ["data"]]], "not a regular expression"),
    ([["dense_0/w", ["model"]]], "axis 'model' is not a mesh axis.*model_devices > 1"),
])
def test_bad_rules_say_what_was_expected(rules, match):
    with pytest.raises(ValueError, match=match):
        make_placement("fsdp", rules=rules)


def test_model_devices_must_divide_the_devices():
    with pytest.raises(ValueError, match="model_devices=2 must divide the 1 devices"):
        make_placement("fsdp", model_devices=2)


# ------------------------------------------------------------- through the CLI
def train_cli(tmp_path, name, *sets, devices=4):
    args = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny_synthetic.toml"),
            "--run-dir", str(tmp_path / name), "--local-devices", str(devices), "--set", "logging.plots=false"]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, env=clean_env(), capture_output=True, text=True, timeout=240, cwd=ROOT)


@pytest.mark.slow
def test_an_fsdp_ensemble_from_the_cli_equals_one_device(tmp_path):
    fsdp = train_cli(tmp_path, "fsdp", 'parallel.mode="fsdp"', "parallel.fsdp_min_size=1", "training.ensemble=2")
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert "fundl: fsdp: train state" in fsdp.stdout
    # the one-device reference: the same config, trained in this process (one device)
    config = cfg.load_config(ROOT / "configs" / "tiny_synthetic.toml", ["logging.plots=false", "training.ensemble=2"])
    experiment.run(config, tmp_path / "one", verbose=False)
    a, b = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("fsdp", "one"))
    assert b["devices"] == 1 and a["devices"] == 4 and a["state_bytes_per_device"] < 0.5 * a["state_bytes"]
    for ma, mb in zip(a["members"], b["members"], strict=True):
        np.testing.assert_allclose(ma["test_loss"], mb["test_loss"], rtol=1e-5)
        np.testing.assert_allclose(ma["train_loss"], mb["train_loss"], rtol=1e-5)


@pytest.mark.slow
def test_a_rule_that_does_not_fit_a_leaf_is_a_config_error(tmp_path):
    proc = train_cli(tmp_path, "bad", 'parallel.mode="fsdp"', "model.hidden=[18]",
                     'parallel.rules=[["dense_0/b$", ["data"]]]')
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ("fundl: error: parallel.rules: 'dense_0/b$' splits dimension 0 of params/dense_0/b (shape (18,)) "
            "over 'data' (4 devices), which does not divide 18") in proc.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists() or not any((tmp_path / "bad" / "checkpoints").iterdir())
