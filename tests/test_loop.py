"""``fit`` and ``evaluate``: the loop's records, checkpoints, fused dispatches, resume, NaN guard,
what it does to the caller's objects, and what it costs beside the step.

The costs (issue 13): the evaluation is compiled before training (a broken one fails before the
first step; no evaluation stops training to compile).
"""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fundl.run import config as cfg
from fundl import models
from fundl.run import experiment
from fundl.data import Dataset, Loader, load_dataset
from fundl.losses import softmax_cross_entropy
from fundl.metrics import accuracy
from fundl.nn.core import ShapeError
from fundl.train import checkpoint as ckpt
from fundl.train import loop
from fundl.train.fusion import Fusion
from fundl.train.loop import Every, NonFiniteLossError, evaluate, fit
from fundl.train.placement import make_placement
from fundl.run.rundir import RunDir, read_metrics
from fundl.train.state import create_train_state
from fundl.train.step import make_eval_step, make_train_step
from conftest import ROOT

TINY = ROOT / "configs" / "tiny_synthetic.toml"
KEY = jax.random.key(0)


def tiny_data(n=256, d=8, classes=3, seed=0):
    return load_dataset("synthetic", num_train=n, num_test=64, input_shape=(d,), num_classes=classes, seed=seed)


def setup(opt=None):
    model = models.mlp([16], 3)
    opt = opt or optax.adam(1e-2)
    return model, opt, create_train_state(model, opt, KEY, (1, 8))


# ----------------------------------------------------------------- evaluate
@pytest.mark.slow
def test_evaluate_weights_every_example_once_with_unequal_batches():
    ds = tiny_data(n=64)
    model, _, state = setup()
    eval_step = jax.jit(make_eval_step(model))
    test = {"x": ds.test["x"][:50], "y": ds.test["y"][:50]}
    logits, _ = model.apply(state.params, state.model_state, jnp.asarray(test["x"]))
    want_loss = float(jnp.mean(softmax_cross_entropy(logits, jnp.asarray(test["y"]))))
    want_acc = float(jnp.mean(accuracy(logits, jnp.asarray(test["y"]))))
    for bs in (7, 16, 50, 64):  # 50 = 7*7+1: last batch of one, padded and masked
        got = evaluate(eval_step, state.params, state.model_state, test, bs)
        assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
        assert got["accuracy"] == pytest.approx(want_acc, abs=1e-6)


# ---------------------------------------------------------------------- fit
def _fit(tmp_path, num_steps=20, *, eval_every=0, checkpoint_every=0, fusion="auto"):
    """fit as the run layer calls it: a run directory's log as on_log, a Checkpointer into it."""
    ds = tiny_data()
    model, opt, state = setup()
    loader = Loader(ds.train, 32, seed=1, drop_last=True, prefetch=0)
    eval_step = jax.jit(make_eval_step(model))
    eval_fn = lambda s: evaluate(eval_step, s.params, s.model_state, ds.test, 32)
    rd = RunDir(tmp_path)
    with ckpt.Checkpointer(rd.checkpoint_dir, keep=3) as saver:
        result = fit(state, make_train_step(model, opt), loader, num_steps=num_steps, eval_fn=eval_fn,
                     every=Every(log=5, eval=eval_every, checkpoint=checkpoint_every), checkpoints=saver,
                     fusion=fusion, on_log=rd.log, progress=False)
    return result, rd, (model, opt, state, loader)


def test_fit_lowers_loss_logs_and_checkpoints(tmp_path):
    result, rd, _ = _fit(tmp_path, eval_every=10, checkpoint_every=10)
    train = [r for r in result.history if r["split"] == "train"]
    evals = [r for r in result.history if r["split"] == "eval"]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    assert [r["step"] for r in evals] == [10, 20]
    assert train[-1]["loss"] < train[0]["loss"]
    assert [p.name for p in ckpt.list_checkpoints(rd.checkpoint_dir)] == ["step_00000010", "step_00000020"]
    assert int(result.state.step) == 20
    logged = [{k: v for k, v in r.items() if k != "wall_time"} for r in read_metrics(rd.path)]
    assert logged == result.history  # on_log got every record, in order


@pytest.mark.slow
def test_fit_fused_equals_per_step(tmp_path):
    a, _, _ = _fit(tmp_path / "a", fusion=Fusion(steps_per_call=1))
    b, _, _ = _fit(tmp_path / "b", fusion=Fusion(steps_per_call=4))
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [r["step"] for r in b.history] == [r["step"] for r in a.history]
    assert (a.steps_per_call, b.steps_per_call, b.unroll) == (1, 4, 1)


@pytest.mark.slow
def test_fit_resumes_to_the_same_params(tmp_path):
    full, _, _ = _fit(tmp_path / "full", num_steps=20)
    half, rd, (model, opt, state, loader) = _fit(tmp_path / "half", num_steps=10)
    restored, _ = ckpt.restore(ckpt.latest_valid(rd.checkpoint_dir), state)
    assert int(restored.step) == 10
    resumed = fit(restored, make_train_step(model, opt), loader, num_steps=20, progress=False)
    for x, y in zip(jax.tree.leaves(full.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_each_checkpoint_holds_the_loader_position_and_the_checkpointers_extras(tmp_path):
    """fit adds the loader position to each save's extras; the caller's constant extras (config,
    run id) come from its Checkpointer; every checkpoint is committed when fit returns."""
    ds = tiny_data()
    model, opt, state = setup()
    loader = Loader(ds.train, 32, seed=1, drop_last=True, prefetch=0)
    with ckpt.Checkpointer(tmp_path, keep=5, extras={"run_id": "abc"}) as saver:
        fit(state, make_train_step(model, opt), loader, num_steps=12, every=Every(log=4, checkpoint=4),
            checkpoints=saver, progress=False)
        assert saver.pending is None  # fit waited for its last save
    saved = ckpt.list_checkpoints(tmp_path)
    assert [p.name for p in saved] == ["step_00000004", "step_00000008", "step_00000012"]
    for path in saved:
        extras = ckpt.read_manifest(path)["extras"]
        assert extras == {"run_id": "abc", "loader": loader.state_at_step(ckpt.step_of(path))}


@pytest.mark.slow
def test_fit_stops_on_non_finite_loss(tmp_path):
    ds = tiny_data()
    model, _, _ = setup()
    opt = optax.sgd(1e30)
    state = create_train_state(model, opt, KEY, (1, 8))
    loader = Loader(ds.train, 32, drop_last=True, prefetch=0)
    with pytest.raises(NonFiniteLossError, match="non-finite training loss"):
        fit(state, make_train_step(model, opt), loader, num_steps=20, every=Every(log=5), progress=False)


def test_fit_checks_its_settings():
    _, model, opt, state, loader = _library_setup()
    step = make_train_step(model, opt)
    with pytest.raises(ValueError, match="Every.log must be an int >= 0"):
        Every(log=-1)
    with pytest.raises(ValueError, match="Every.checkpoint must be an int >= 0"):
        Every(checkpoint=2.5)
    with pytest.raises(TypeError, match="every must be a fundl.train.loop.Every"):
        fit(state, step, loader, num_steps=2, every=10, progress=False)
    with pytest.raises(ValueError, match="past num_steps=2"):
        fit(state.replace(step=state.step + 3), step, loader, num_steps=2, progress=False)


def _library_setup():
    ds = load_dataset("synthetic", num_train=128, num_test=32, input_shape=(8,), num_classes=3, seed=0)
    model, opt = models.mlp([16], 3), optax.adam(1e-2)
    state = create_train_state(model, opt, jax.random.key(0), (1, 8))
    loader = Loader(ds.train, 32, seed=1, drop_last=True, prefetch=0)
    return ds, model, opt, state, loader


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "pmap", "sharding"])
@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_the_callers_state_stays_valid_after_fit(mode, steps_per_call):
    """The compiled step donates its input; fit must donate a copy, not the caller's arrays."""
    _, model, opt, state, loader = _library_setup()
    before = [np.array(x) for x in jax.tree.leaves(state.params)]
    result = fit(state, make_train_step(model, opt), loader, num_steps=4, progress=False,
                 placement=make_placement(mode), fusion=Fusion(steps_per_call=steps_per_call))
    after = [np.asarray(x) for x in jax.tree.leaves(state.params)]  # raised "Array has been deleted"
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 0 and int(result.state.step) == 4
    again = fit(state, make_train_step(model, opt), loader, num_steps=4, progress=False,
                placement=make_placement(mode), fusion=Fusion(steps_per_call=steps_per_call))  # reused
    for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(again.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_a_resumed_finished_run_reports_its_evaluation_like_any_other(tmp_path):
    """One record builder: the evaluation of an already finished run has its epoch, reaches
    metrics.jsonl and on_log (its former second copy skipped all three)."""
    ds, model, opt, state, loader = _library_setup()
    eval_step = jax.jit(make_eval_step(model))
    eval_fn = lambda s: evaluate(eval_step, s.params, s.model_state, ds.test, 32)
    with RunDir(tmp_path) as rd, ckpt.Checkpointer(rd.checkpoint_dir, keep=3) as saver:
        first = fit(state, make_train_step(model, opt), loader, num_steps=8, eval_fn=eval_fn, checkpoints=saver,
                    on_log=rd.log, progress=False)
    restored, _ = ckpt.restore(ckpt.latest_valid(tmp_path / "checkpoints"), state)
    seen = []
    with RunDir(tmp_path, existing="resume") as rd, ckpt.Checkpointer(rd.checkpoint_dir, keep=3) as saver:
        def log(record):
            rd.log(record)
            seen.append(record)

        again = fit(restored, make_train_step(model, opt), loader, num_steps=8, eval_fn=eval_fn,
                    checkpoints=saver, progress=False, on_log=log)
    assert [r["split"] for r in again.history] == ["eval"] and seen == again.history
    record = again.history[0]
    assert record["step"] == 8 and record["epoch"] == first.final_eval["epoch"] == 1
    assert record["accuracy"] == first.final_eval["accuracy"]
    assert [r["step"] for r in read_metrics(tmp_path) if r["split"] == "eval"] == [8, 8]


# ------------------------------------------- what the loop costs beside the step
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def tiny(*overrides):
    return cfg.load_config(TINY, ["logging.plots=false", *overrides])


class CompileCounter:
    """Counts XLA backend compilations while active (JAX's own monitoring event)."""

    def __init__(self):
        self.count = 0
        self.active = False

    def __call__(self, event, duration, **kwargs):
        if self.active and event == COMPILE_EVENT:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def eval_compiles(config: dict, run_dir: Path) -> list[int]:
    """Run ``config`` through ``fundl.run.experiment.run`` and count the XLA compiles inside each
    evaluation ``fit`` runs."""
    compiles_per_eval = []
    real_fit = loop.fit

    def fit_counting_eval_compiles(*args, eval_fn, **kwargs):
        def counted(state):
            counter.active, before = True, counter.count
            try:
                return eval_fn(state)
            finally:
                counter.active = False
                compiles_per_eval.append(counter.count - before)

        return real_fit(*args, eval_fn=counted, **kwargs)

    experiment.fit = fit_counting_eval_compiles
    try:
        with CompileCounter() as counter:
            summary = experiment.run(config, run_dir, verbose=False)
    finally:
        experiment.fit = real_fit
    assert summary["test_accuracy"] is not None
    return compiles_per_eval


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [[], ["training.ensemble=2"]], ids=["one", "ensemble"])
def test_no_evaluation_inside_fit_compiles(tmp_path, overrides):
    """Every evaluation fit runs finds the eval step compiled: none stops training to compile
    (the first one did, in the middle of the MNIST-1D runs: docs/benchmarks.md)."""
    assert eval_compiles(tiny(*overrides), tmp_path / "run") == [0, 0]  # at steps 12 and 24 of 24


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pmap", "sharding", "fsdp"])
def test_no_evaluation_inside_fit_compiles_on_two_devices(tmp_path, mode):
    """The same under every multi-device placement (2 fake CPU devices, in a fresh process): the
    state compiled for ahead of training is placed as fit's is, so the compiled eval step is reused."""
    code = (f"import jax; jax.config.update('jax_num_cpu_devices', 2)\n"
            f"import importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('test_loop', {__file__!r})\n"
            f"t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)\n"
            f"from pathlib import Path\n"
            f"print(t.eval_compiles(t.tiny('parallel.mode=\"{mode}\"'), Path({str(tmp_path / 'run')!r})))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=ROOT / "tests")  # -c puts the working directory first on the path: conftest
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[0, 0]"


def test_the_counter_sees_a_compile():
    """The check above can fail: a fresh jitted function counts one compile."""
    with CompileCounter() as counter:
        counter.active = True
        jax.jit(lambda x: x * 3.0 + 1.0)(np.ones(7, np.float32))
    assert counter.count == 1


def test_a_test_split_the_model_cannot_take_fails_before_training(tmp_path, monkeypatch):
    """An evaluation that cannot run fails before the first train step, not after eval_every steps."""
    real_load = experiment.load_data

    def load_with_bad_test(config):
        ds = real_load(config)
        bad = {**ds.test, "x": np.concatenate([ds.test["x"], ds.test["x"]], axis=1)}  # twice the features
        return Dataset(ds.name, ds.train, bad, ds.num_classes, ds.input_shape, ds.meta)

    monkeypatch.setattr(experiment, "load_data", load_with_bad_test)
    with pytest.raises(ShapeError, match=r"dense_0.*expected input of shape \(\.\.\., 16\), got shape \(64, 32\)"):
        experiment.run(tiny("training.eval_every=20", "training.steps=24"), tmp_path / "run", verbose=False)
    records = read_metrics(tmp_path / "run") if (tmp_path / "run" / "metrics.jsonl").exists() else []
    assert [r for r in records if r["split"] == "train"] == []
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))
