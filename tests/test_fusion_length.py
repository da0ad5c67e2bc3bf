"""The "auto" fusion rule weighs the fused program's compile against the run's length: a run too
short to repay one more compiled program runs single steps (fundl.train.fusion.AUTO_MIN_STEPS)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fundl import models
from fundl.data import Loader
from fundl.train.fusion import AUTO_MIN_STEPS, AUTO_STEPS_PER_CALL, Fusion, resolve
from fundl.train.loop import Every, fit
from fundl.train.state import create_train_state
from fundl.train.step import make_train_step


def test_auto_fuses_only_runs_long_enough_to_repay_the_compile():
    model, opt = models.mlp([4], 3), optax.sgd(0.1)
    state = create_train_state(model, opt, 0, (1, 4))
    step = make_train_step(model, opt)
    batch = {"x": jnp.ones((8, 4)), "y": jnp.zeros(8, jnp.int32)}
    k = AUTO_STEPS_PER_CALL["dense"]
    assert k > 1
    assert resolve(Fusion(), step, state, batch, steps=AUTO_MIN_STEPS - 1) == (1, 1)
    assert resolve(Fusion(), step, state, batch, steps=AUTO_MIN_STEPS)[0] == k
    assert resolve(Fusion(), step, state, batch)[0] == k  # length unknown: the long-run choice
    assert resolve(Fusion(steps_per_call=4), step, state, batch, steps=10)[0] == 4  # asked for: as asked


@pytest.mark.slow
def test_fit_tells_the_rule_the_runs_length():
    model, opt = models.mlp([4], 3), optax.sgd(0.1)
    state = create_train_state(model, opt, 0, (1, 4))
    step = make_train_step(model, opt)
    rng = np.random.default_rng(0)
    train = {"x": rng.normal(size=(64, 4)).astype(np.float32), "y": rng.integers(0, 3, 64).astype(np.int32)}
    short = fit(state, step, Loader(train, batch_size=8, drop_last=True), num_steps=20, every=Every(log=10),
                progress=False)
    assert short.steps_per_call == 1
