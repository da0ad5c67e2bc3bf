"""float16 training with a dynamic loss scale (fundl.train.loss_scale)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fundl import models, nn
from fundl.data import load_dataset
from fundl.losses import mse
from fundl.nn import flat_random
from fundl.train import checkpoint as ckpt
from fundl.train.fusion import make_multi_step
from fundl.train.loss_scale import LossScale, update
from fundl.train.state import create_train_state, is_prng_key
from fundl.train.step import make_train_step

NO_METRICS = lambda out, y: {}
X = flat_random.normal(jax.random.key(1), (8, 4))
Y = flat_random.normal(jax.random.key(2), (8, 4))
BATCH = {"x": X, "y": Y}
OVERFLOW = {"x": X, "y": Y.at[0, 0].set(1e4)}  # finite loss, but 2**15 * dloss/dout > 65504 in float16


def setup(model=None, opt=None, growth_interval=2000, **kw):
    """A dense (+ batch norm) regression model and its float16 train state and step."""
    model = model or nn.serial(nn.dense(4), nn.batch_norm())
    opt = opt or optax.adam(1e-2)
    state = create_train_state(model, opt, 0, (1, 4), compute_dtype="float16")
    state = state.replace(loss_scale=LossScale.create(growth_interval=growth_interval))
    return state, make_train_step(model, opt, mse, NO_METRICS, compute_dtype="float16", **kw)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if is_prng_key(x):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_dynamic_scale_rescues_gradients_that_underflow_in_float16():
    """Gradients of ~1e-9 flush to zero in float16 (smallest subnormal ~6e-8): without a
    scale the params do not move; with the dynamic scale (2**15) one SGD step equals the
    float32 step to 5e-3 of its size (a fixed 2**12 is off by ~2e-2)."""
    model, opt = nn.dense(4), optax.sgd(1e6)
    tiny_mse = lambda out, y: 1e-8 * mse(out, y)
    deltas = {}
    for dtype, scale in [("float32", None), ("float16", 1.0), ("float16", None)]:
        state = create_train_state(model, opt, 0, (1, 4), compute_dtype=dtype, loss_scale=scale)
        step = jax.jit(make_train_step(model, opt, tiny_mse, NO_METRICS, compute_dtype=dtype, loss_scale=scale))
        new, _ = step(state, BATCH)
        deltas[dtype, scale] = jax.tree.map(lambda a, b: np.asarray(a - b), new.params, state.params)
    assert_trees_equal(deltas["float16", 1.0], jax.tree.map(np.zeros_like, deltas["float32", None]))
    for got, want in zip(jax.tree.leaves(deltas["float16", None]), jax.tree.leaves(deltas["float32", None])):
        assert np.abs(want).max() > 1e-3  # the update is well above float32 rounding of the params
        np.testing.assert_allclose(got, want, atol=5e-3 * np.abs(want).max())


@pytest.mark.slow
def test_overflow_skips_the_update_and_halves_the_scale():
    state, step = setup()
    step = jax.jit(step)
    state, m = step(state, BATCH)
    state, m = step(state, BATCH)
    assert int(state.loss_scale.good_steps) == 2 and float(m["loss_scale"]) == 2.0**15
    new, m = step(state, OVERFLOW)
    assert np.isfinite(float(m["loss"]))  # only the scaled gradients overflowed
    assert float(new.loss_scale.scale) == 2.0**14 and int(new.loss_scale.good_steps) == 0
    assert_trees_equal((new.params, new.opt_state, new.model_state),
                       (state.params, state.opt_state, state.model_state))  # bit-identical: skipped
    assert int(new.step) == int(state.step) + 1
    after, m = step(new, BATCH)  # the next finite step applies at the lower scale
    assert float(m["loss_scale"]) == 2.0**14 and int(after.loss_scale.good_steps) == 1
    assert not np.array_equal(np.asarray(after.params["dense_0"]["w"]), np.asarray(new.params["dense_0"]["w"]))


@pytest.mark.slow
def test_scale_grows_after_growth_interval_finite_steps_and_never_drops_below_one():
    state, step = setup(growth_interval=3)
    step = jax.jit(step)
    scales = []
    for _ in range(5):
        state, m = step(state, BATCH)
        scales.append(float(m["loss_scale"]))
    assert scales == [2.0**15] * 3 + [2.0**16] * 2
    assert float(state.loss_scale.scale) == 2.0**16 and int(state.loss_scale.good_steps) == 2
    state, _ = step(state, BATCH)
    assert float(state.loss_scale.scale) == 2.0**17 and int(state.loss_scale.good_steps) == 0
    ls = LossScale.create(1.0, growth_interval=3)
    ls = update(update(ls, jnp.array(True)), jnp.array(False))
    assert float(ls.scale) == 1.0 and int(ls.good_steps) == 0


def test_loss_scale_survives_a_checkpoint_round_trip(tmp_path):
    state, step = setup(growth_interval=3)
    step = jax.jit(step)
    for batch in (BATCH, OVERFLOW, BATCH):
        state, _ = step(state, batch)
    path = ckpt.save(tmp_path, state, step=3)
    assert {"loss_scale/scale", "loss_scale/good_steps"} <= set(ckpt.read_manifest(path)["leaves"])
    template, _ = setup(growth_interval=3)
    restored, _ = ckpt.restore(path, template)
    assert float(restored.loss_scale.scale) == 2.0**14 and int(restored.loss_scale.good_steps) == 1
    assert_trees_equal(restored, state)
    assert restored.loss_scale.growth_interval == 3


@pytest.mark.slow
def test_vmapped_ensemble_decides_per_member_and_multi_step_equals_single_steps():
    state, step = setup(growth_interval=2)
    states = jax.tree.map(lambda a: jnp.stack([a, a]), state)
    batches = jax.tree.map(lambda a, b: jnp.stack([a, b]), BATCH, OVERFLOW)
    new, _ = jax.jit(jax.vmap(step))(states, batches)
    np.testing.assert_array_equal(new.loss_scale.scale, [2.0**15, 2.0**14])
    np.testing.assert_array_equal(new.loss_scale.good_steps, [1, 0])
    w, w0 = np.asarray(new.params["dense_0"]["w"]), np.asarray(state.params["dense_0"]["w"])
    assert not np.array_equal(w[0], w0) and np.array_equal(w[1], w0)

    seq = [BATCH, OVERFLOW, BATCH, BATCH, BATCH]
    fused, fm = jax.jit(make_multi_step(step))(state, jax.tree.map(lambda *a: jnp.stack(a), *seq))
    single = state
    for b in seq:
        single, _ = jax.jit(step)(single, b)
    assert_trees_equal(fused, single)
    np.testing.assert_array_equal(fm["loss_scale"], [2.0**15, 2.0**15, 2.0**14, 2.0**14, 2.0**15])


@pytest.mark.slow
def test_overflow_on_one_device_skips_the_update_on_every_device():
    """Under a named axis (as in pmap) the decision is taken after the gradient pmean."""
    model = nn.serial(nn.dense(4), nn.batch_norm(axis_name="batch"))
    state, step = setup(model, axis_name="batch")
    shards = jax.tree.map(lambda a, b: jnp.stack([a, b]), BATCH, OVERFLOW)
    new, _ = jax.jit(jax.vmap(step, in_axes=(None, 0), axis_name="batch"))(state, shards)
    np.testing.assert_array_equal(new.loss_scale.scale, [2.0**14, 2.0**14])
    for device in (0, 1):
        kept = jax.tree.map(lambda a, d=device: a[d], (new.params, new.opt_state, new.model_state))
        assert_trees_equal(kept, (state.params, state.opt_state, state.model_state))


def test_float32_and_bfloat16_states_have_exactly_the_leaves_they_had():
    model, opt = nn.serial(nn.dense(4), nn.batch_norm()), optax.adam(1e-2)
    for dtype, scale in [("float32", None), ("bfloat16", None), ("float32", 0.0), ("float16", 1024.0)]:
        state = create_train_state(model, opt, 0, (1, 4), compute_dtype=dtype, loss_scale=scale)
        assert state.loss_scale is None
        old = (state.step, state.params, state.model_state, state.opt_state, state.key)
        assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(old))
        assert all(a is b for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(old)))
        assert not any("loss_scale" in p for p in ckpt.flatten_state(state))
    f16 = create_train_state(model, opt, 0, (1, 4), compute_dtype="float16", loss_scale=0.0)
    assert len(jax.tree.leaves(f16)) == len(jax.tree.leaves(state)) + 2
    assert float(f16.loss_scale.scale) == 2.0**15 and f16.loss_scale.growth_interval == 2000


@pytest.mark.slow
def test_dynamic_float16_step_without_loss_scale_state_says_how_to_build_it():
    model, opt = nn.dense(4), optax.sgd(0.1)
    state = create_train_state(model, opt, 0, (1, 4))
    with pytest.raises(ValueError, match=r"create_train_state\(\.\.\., compute_dtype='float16'\)"):
        make_train_step(model, opt, mse, NO_METRICS, compute_dtype="float16")(state, BATCH)
    # a fixed scale needs no state (non-finite gradients are then left to training.nan_policy)
    new, m = make_train_step(model, opt, mse, NO_METRICS, compute_dtype="float16", loss_scale=256.0)(state, BATCH)
    assert "loss_scale" not in m and new.loss_scale is None


@pytest.mark.slow
def test_float16_training_tracks_float32():
    """An MLP classifier trained in float16 with the default dynamic scale ends within
    0.05 of the float32 run's loss (replaces the old finiteness-only float16 test)."""
    ds = load_dataset("synthetic", num_train=512, num_test=64, input_shape=(8,), num_classes=3, seed=0)
    model, opt = models.mlp([32], 3), optax.adam(1e-2)
    finals = {}
    for dtype in ("float32", "float16"):
        state = create_train_state(model, opt, jax.random.key(0), (1, 8), compute_dtype=dtype)
        step = jax.jit(make_train_step(model, opt, compute_dtype=dtype))
        for i in range(60):
            s = 64 * (i % 8)
            state, m = step(state, {"x": jnp.asarray(ds.train["x"][s:s + 64]),
                                    "y": jnp.asarray(ds.train["y"][s:s + 64])})
        finals[dtype] = float(m["loss"])
    assert finals["float32"] < 0.6
    assert abs(finals["float16"] - finals["float32"]) < 0.05, finals
