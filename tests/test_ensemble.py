"""Ensembles and sweeps: member i of one compiled program equals a separate run of its settings."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fundl.nn import flat_random
from fundl.run import config as cfg
from fundl.run import experiment, sweeps
from fundl.run.build import placement_from_config
from fundl.run.rundir import read_metrics
from fundl.train import checkpoint as ckpt
from fundl.train.loop import NonFiniteLossError
from conftest import ROOT

TINY = ROOT / "configs" / "tiny_synthetic.toml"
BASE = ["logging.plots=false", "training.steps=20", "training.eval_every=10", "training.checkpoint_every=10",
        "model.dropout=0.2"]  # dropout: the member's step keys matter too


def tiny(*overrides):
    return cfg.load_config(TINY, [*BASE, *overrides])


def final_arrays(run_dir) -> dict:
    return ckpt.load_arrays(ckpt.latest_valid(Path(run_dir) / "checkpoints"))


def assert_member_equals(ensemble: dict, i: int, single: dict, rtol=1e-5):
    assert sorted(ensemble) == sorted(single)
    for k, want in single.items():
        got = ensemble[k][i]
        assert got.shape == want.shape, k
        if want.dtype.kind == "f":
            scale = max(float(np.max(np.abs(want))), 1e-12)
            assert float(np.max(np.abs(got - want))) <= rtol * scale, k
        else:
            np.testing.assert_array_equal(got, want, err_msg=k)


@pytest.mark.slow
def test_ensemble_member_i_equals_a_separate_run_with_seed_plus_i(tmp_path):
    summary = experiment.run(tiny("training.ensemble=3", "training.seed=5"), tmp_path / "ens", verbose=False)
    ens = final_arrays(tmp_path / "ens")
    assert ens["params/dense_0/w"].shape[0] == 3 and summary["final_step"] == 20
    for i in range(3):
        single = experiment.run(tiny(f"training.seed={5 + i}"), tmp_path / f"single{i}", verbose=False)
        assert_member_equals(ens, i, final_arrays(tmp_path / f"single{i}"))
        m = summary["members"][i]
        assert m["seed"] == 5 + i and m["overrides"] == {}
        assert m["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=1e-6)
        assert m["test_loss"] == pytest.approx(single["test_loss"], rel=1e-5)
    assert summary["test_accuracy"] == summary["ensemble_test_accuracy"]
    # per-member metrics in metrics.jsonl; the eval record holds each member and the ensemble's prediction
    records = read_metrics(tmp_path / "ens")
    train = [r for r in records if r["split"] == "train"]
    assert all(len(r["members"]) == 3 for r in train)
    assert train[-1]["loss"] == pytest.approx(np.mean([m["loss"] for m in train[-1]["members"]]), rel=1e-5)
    final_eval = [r for r in records if r["split"] == "eval"][-1]
    assert [m["accuracy"] for m in final_eval["members"]] == [m["test_accuracy"] for m in summary["members"]]


@pytest.mark.slow
def test_the_ensemble_prediction_is_the_mean_of_member_probabilities(tmp_path):
    import jax
    import jax.numpy as jnp

    from fundl.losses import softmax_cross_entropy
    from fundl.metrics import classification_metrics
    from fundl.train.ensemble import make_ensemble_eval_step
    from fundl import models

    model = models.mlp([4], 3)
    keys = jax.random.split(jax.random.key(0), 2)
    params = jax.vmap(lambda k: model.init(k, (1, 5))[0])(keys)
    x, y = flat_random.normal(jax.random.key(1), (6, 5)), jnp.array([0, 1, 2, 0, 1, 2])
    sums = make_ensemble_eval_step(model, softmax_cross_entropy, classification_metrics())(params, {}, {"x": x, "y": y})
    probs = jnp.mean(jnp.stack([jax.nn.softmax(model.apply(jax.tree.map(lambda p: p[i], params), {}, x)[0])
                                for i in range(2)]), axis=0)
    assert float(sums["count"]) == 6
    np.testing.assert_allclose(float(sums["loss"]), float(-jnp.sum(jnp.log(probs[jnp.arange(6), y]))), rtol=1e-5)
    assert float(sums["accuracy"]) == float(jnp.sum(jnp.argmax(probs, -1) == y))
    for i in range(2):
        logits = model.apply(jax.tree.map(lambda p: p[i], params), {}, x)[0]
        np.testing.assert_allclose(float(sums[f"members/{i}/loss"]), float(jnp.sum(softmax_cross_entropy(logits, y))),
                                   rtol=1e-5)


@pytest.mark.slow
def test_sweep_member_j_equals_a_separate_run_with_its_values(tmp_path):
    sweep = ['training.sweep=["optimizer.learning_rate=0.003,0.03", "training.seed=0,1"]']
    summary = experiment.run(tiny(*sweep), tmp_path / "sweep", verbose=False)
    ens = final_arrays(tmp_path / "sweep")
    assert [m["overrides"] for m in summary["members"]] == [
        {"optimizer.learning_rate": lr, "training.seed": s} for lr in (0.003, 0.03) for s in (0, 1)]
    for j, m in enumerate(summary["members"]):
        lr, seed = m["overrides"]["optimizer.learning_rate"], m["overrides"]["training.seed"]
        experiment.run(tiny(f"optimizer.learning_rate={lr}", f"training.seed={seed}"), tmp_path / f"s{j}",
                       verbose=False)
        single = final_arrays(tmp_path / f"s{j}")
        # the injected learning rate lives in the optimiser state of the sweep: compare params and model state
        shared = {k: v for k, v in single.items() if not k.startswith("opt_state/")}
        assert_member_equals({k: ens[k] for k in shared}, j, shared)
    for name in ("sweep.csv", "sweep.md", "sweep.png"):
        assert (tmp_path / "sweep" / name).is_file()
    rows = (tmp_path / "sweep" / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("member,seed,optimizer.learning_rate,training.seed,train_loss") and len(rows) == 5
    best = summary["best_member"]
    assert summary["test_loss"] == min(m["test_loss"] for m in summary["members"]) == summary["members"][best]["test_loss"]
    assert "← |" in (tmp_path / "sweep" / "sweep.md").read_text().splitlines()[2 + best]


@pytest.mark.slow
def test_a_sweep_over_shapes_runs_each_point_separately(tmp_path):
    r = subprocess.run([sys.executable, "scripts/train.py", "--config", str(TINY), "--run-dir", str(tmp_path / "run"),
                        "--quiet", "--set", "logging.plots=false", "--set", "training.steps=8",
                        "--sweep", "model.hidden=[4],[8]", "--sweep", "optimizer.learning_rate=0.01,0.03"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "the sweep over model.hidden changes shapes or structure, so its 4 points run as separate runs" in r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["separate_runs"] and len(summary["members"]) == 4
    for k, m in enumerate(summary["members"]):
        member = json.loads((tmp_path / "run" / "members" / str(k) / "summary.json").read_text())
        assert member["test_accuracy"] == m["test_accuracy"]
        assert cfg.load_config(tmp_path / "run" / "members" / str(k) / "config.toml")["model"]["hidden"] == \
            m["overrides"]["model.hidden"]
    assert (tmp_path / "run" / "sweep.png").is_file()


@pytest.mark.slow
def test_fused_ensemble_steps_equal_single_ones(tmp_path):
    a = experiment.run(tiny("training.ensemble=2", "training.steps_per_call=1"), tmp_path / "a", verbose=False)
    b = experiment.run(tiny("training.ensemble=2", "training.steps_per_call=5"), tmp_path / "b", verbose=False)
    assert (a["steps_per_call"], b["steps_per_call"]) == (1, 5)
    fa, fb = final_arrays(tmp_path / "a"), final_arrays(tmp_path / "b")
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)  # a rolled scan: bit-identical


@pytest.mark.slow
def test_a_diverging_member_is_named(tmp_path):
    config = tiny('training.sweep=["optimizer.learning_rate=0.01,1e6"]', 'optimizer.name="sgd"',
                  "training.log_every=2", "model.dropout=0.0")
    with pytest.raises(NonFiniteLossError, match="of ensemble member 1"):
        experiment.run(config, tmp_path, verbose=False)


@pytest.mark.slow
def test_skipped_updates_count_every_member(tmp_path):
    """nan_policy="skip": the summary counts the skipped updates of all members, not member 0's."""
    skip = ['optimizer.name="sgd"', "model.dropout=0.0", 'training.nan_policy="skip"']
    experiment.run(tiny(*skip, "optimizer.learning_rate=1e6"), tmp_path / "alone", verbose=False)
    alone = json.loads((tmp_path / "alone" / "summary.json").read_text())["skipped_updates"]
    assert alone > 0
    experiment.run(tiny(*skip, 'training.sweep=["optimizer.learning_rate=0.01,1e6,1e6"]'), tmp_path / "sweep",
                   verbose=False)
    assert json.loads((tmp_path / "sweep" / "summary.json").read_text())["skipped_updates"] == 2 * alone


@pytest.mark.slow
def test_a_killed_ensemble_resumes_bit_identically(tmp_path):
    args = ["--config", str(TINY), "--quiet", "--set", "logging.plots=false", "--set", "training.steps=20",
            "--set", "training.checkpoint_every=5", "--set", "training.ensemble=2", "--set", "model.dropout=0.2"]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    run = lambda *a, fault="": subprocess.run([sys.executable, "tests/fault_driver.py", *a], cwd=ROOT,
                                               env={**env, "FUNDL_FAULT": fault}, capture_output=True, text=True,
                                               timeout=300)
    assert run(*args, "--run-dir", str(tmp_path / "ref")).returncode == 0
    assert run(*args, "--run-dir", str(tmp_path / "run"), fault="step=13").returncode == -signal.SIGKILL
    r = run("--resume", str(tmp_path / "run"), "--quiet")
    assert r.returncode == 0, r.stderr
    ref, got = final_arrays(tmp_path / "ref"), final_arrays(tmp_path / "run")
    for k in ref:
        assert ref[k].tobytes() == got[k].tobytes(), k


def test_sweep_parsing_and_errors():
    assert sweeps.parse_sweep("optimizer.learning_rate=1e-3, 3e-3,0.01") == ("optimizer.learning_rate", [1e-3, 3e-3, 0.01])
    assert sweeps.parse_sweep("model.hidden=[64],[64, 64]") == ("model.hidden", [[64], [64, 64]])
    assert sweeps.parse_sweep('model.kind="mlp",cnn1d') == ("model.kind", ["mlp", "cnn1d"])
    for bad, match in [("lr=1,2", "section.key"), ("optimizer.lr=1,2", "not a config setting"),
                       ("optimizer.learning_rate=1,,2", "empty value")]:
        with pytest.raises(cfg.ConfigError, match=match):
            sweeps.parse_sweep(bad)
    with pytest.raises(cfg.ConfigError, match="sweep the seed instead"):  # a rule between keys: on validation
        tiny("training.ensemble=2", 'training.sweep=["training.seed=0,1"]')
    config = tiny('training.sweep=["optimizer.learning_rate=0.1,0.2", "model.hidden=[4],[8]"]')
    assert sweeps.in_one_program(config) == (False, ["model.hidden"])
    assert sweeps.in_one_program(tiny('training.sweep=["optimizer.learning_rate=0.1,0.2"]')) == (True, [])


@pytest.mark.slow
@pytest.mark.parametrize("member_devices", [1, 2])
def test_a_sharded_ensemble_on_four_devices_equals_one_device(tmp_path, member_devices):
    """Members replicated with each member's batch split over 4 devices (member_devices = 1), or a
    2 x 2 members x data mesh (2): the single-device ensemble's parameters within float32 rounding."""
    args = ["--config", str(TINY), "--quiet", "--set", "logging.plots=false", "--set", "training.steps=20",
            "--set", "training.ensemble=2", "--set", "model.dropout=0.2", "--set", "training.eval_every=10"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNDL_") and k != "XLA_FLAGS"}
    run = lambda *a: subprocess.run([sys.executable, "scripts/train.py", *args, *a], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=300)
    r = run("--run-dir", str(tmp_path / "one"))
    assert r.returncode == 0, r.stderr
    r = run("--run-dir", str(tmp_path / "four"), "--local-devices", "4", "--set", 'parallel.mode="sharding"',
            "--set", f"parallel.member_devices={member_devices}")
    assert r.returncode == 0, r.stderr
    one, four = final_arrays(tmp_path / "one"), final_arrays(tmp_path / "four")
    for i in range(2):
        assert_member_equals(four, i, {k: v[i] for k, v in one.items()})
    s1, s4 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "four"))
    assert s4["devices"] == 4
    for a, b in zip(s1["members"], s4["members"]):
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-5)


def test_ensembles_refuse_pmap_with_a_reason():
    with pytest.raises(cfg.ConfigError, match="not 'pmap'"):
        placement_from_config(tiny("training.ensemble=2", 'parallel.mode="pmap"'))
