"""``fit`` as a library call: what it does to the caller's objects and to its records."""

import jax
import numpy as np
import optax
import pytest

from fundl import models
from fundl.data import Loader, load_dataset
from fundl.train import checkpoint as ckpt
from fundl.train.loop import evaluate, fit
from fundl.train.placement import make_placement
from fundl.train.rundir import RunDir, read_metrics
from fundl.train.state import create_train_state
from fundl.train.step import make_eval_step, make_train_step


def setup():
    ds = load_dataset("synthetic", num_train=128, num_test=32, input_shape=(8,), num_classes=3, seed=0)
    model, opt = models.mlp([16], 3), optax.adam(1e-2)
    state = create_train_state(model, opt, jax.random.key(0), (1, 8))
    loader = Loader(ds.train, 32, seed=1, drop_last=True, prefetch=0)
    return ds, model, opt, state, loader


@pytest.mark.parametrize("mode", ["none", "pmap", "sharding"])
@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_the_callers_state_stays_valid_after_fit(mode, steps_per_call):
    """The compiled step donates its input; fit must donate a copy, not the caller's arrays."""
    _, model, opt, state, loader = setup()
    before = [np.array(x) for x in jax.tree.leaves(state.params)]
    result = fit(state, make_train_step(model, opt), loader, num_steps=4, progress=False,
                 placement=make_placement(mode), steps_per_call=steps_per_call)
    after = [np.asarray(x) for x in jax.tree.leaves(state.params)]  # raised "Array has been deleted"
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 0 and int(result.state.step) == 4
    again = fit(state, make_train_step(model, opt), loader, num_steps=4, progress=False,
                placement=make_placement(mode), steps_per_call=steps_per_call)  # the same state, reused
    for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(again.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_resumed_finished_run_reports_its_evaluation_like_any_other(tmp_path):
    """One record builder: the evaluation of an already finished run has its epoch, reaches
    metrics.jsonl and on_log (its former second copy skipped all three)."""
    ds, model, opt, state, loader = setup()
    eval_step = jax.jit(make_eval_step(model))
    eval_fn = lambda s: evaluate(eval_step, s.params, s.model_state, ds.test, 32)
    with RunDir(tmp_path) as rd:
        first = fit(state, make_train_step(model, opt), loader, num_steps=8, eval_fn=eval_fn, run_dir=rd,
                    progress=False)
    restored, _ = ckpt.restore(ckpt.latest_valid(tmp_path / "checkpoints"), state)
    seen = []
    with RunDir(tmp_path, existing="resume") as rd:
        again = fit(restored, make_train_step(model, opt), loader, num_steps=8, eval_fn=eval_fn, run_dir=rd,
                    progress=False, on_log=seen.append)
    assert [r["split"] for r in again.history] == ["eval"] and seen == again.history
    record = again.history[0]
    assert record["step"] == 8 and record["epoch"] == first.final_eval["epoch"] == 1
    assert record["accuracy"] == first.final_eval["accuracy"]
    assert [r["step"] for r in read_metrics(tmp_path) if r["split"] == "eval"] == [8, 8]
