"""The train state, pure steps, fused steps (``fundl.train.fusion``) and optimisers in a step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fundl import models, nn
from fundl.data import load_dataset
from fundl.losses import softmax_cross_entropy
from fundl.nn import flat_random
from fundl.train.ensemble import stack_states
from fundl.train.fusion import AUTO_STEPS_PER_CALL, AUTO_UNROLL, Fusion, make_multi_step, resolve, step_family
from fundl.train.optim import make_optimizer, make_schedule
from fundl.train.placement import make_placement
from fundl.train.state import create_train_state, current_step
from fundl.train.step import make_train_step

KEY = jax.random.key(0)


def tiny_data(n=256, d=8, classes=3, seed=0):
    ds = load_dataset("synthetic", num_train=n, num_test=64, input_shape=(d,), num_classes=classes, seed=seed)
    return ds


def setup(opt=None, model=None, d=8, classes=3):
    model = model or models.mlp([16], classes)
    opt = opt or optax.adam(1e-2)
    state = create_train_state(model, opt, KEY, (1, d))
    return model, opt, state


def batch_of(ds, n=32, start=0):
    return {"x": jnp.asarray(ds.train["x"][start:start + n]), "y": jnp.asarray(ds.train["y"][start:start + n])}


def tree_allclose(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


# -------------------------------------------------------------- train state
@pytest.mark.slow
def test_the_base_key_is_raw_key_data_and_a_typed_key_gives_the_same_steps():
    """TrainState.key holds uint32 key data (a typed key leaf costs dispatch time: docs/benchmarks.md);
    a state built with a typed key by hand trains identically."""
    ds = tiny_data()
    model = nn.serial(nn.dense(8), nn.dropout(0.5), nn.dense(3))  # uses the step key
    opt = optax.sgd(0.1)
    raw = create_train_state(model, opt, KEY, (1, 8))
    assert raw.key.dtype == jnp.uint32 and not jax.dtypes.issubdtype(raw.key.dtype, jax.dtypes.prng_key)
    typed = raw.replace(key=jax.random.wrap_key_data(raw.key))
    step = jax.jit(make_train_step(model, opt))
    for _ in range(3):
        raw, _ = step(raw, batch_of(ds))
        typed, _ = step(typed, batch_of(ds))
    for a, b in zip(jax.tree.leaves(raw.params), jax.tree.leaves(typed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_create_train_state_works_under_jit_vmap_and_equals_the_eager_state():
    """Inside an outer jit the key is a tracer (a nested jit may not take compiler_options):
    the state is built inline, equal to the top-level one; under vmap each member equals its own."""
    model = nn.serial(nn.dense(8), nn.relu, nn.dense(3))
    opt = optax.adam(1e-3)
    eager = create_train_state(model, opt, KEY, (1, 8))
    jitted = jax.jit(lambda k: create_train_state(model, opt, k, (1, 8)))(KEY)
    tree_allclose(jitted, eager, rtol=1e-6, atol=0)   # XLA:CPU builds the eager one at opt level 0
    keys = jax.random.split(KEY, 3)
    both = jax.jit(jax.vmap(lambda k: create_train_state(model, opt, k, (1, 8))))(keys)
    second = create_train_state(model, opt, keys[1], (1, 8))
    tree_allclose(jax.tree.map(lambda x: x[1], both), second, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["none", "pmap", "sharding"])
def test_current_step_reads_a_plain_placed_or_ensemble_state(mode):
    """One helper for "the step as an int": plain, placed by any placement, with a member axis."""
    model, opt, state = setup()
    state = state.replace(step=jnp.int32(7))
    members = stack_states([state, state, state])
    placement = make_placement(mode)
    assert current_step(state) == current_step(members) == 7
    assert current_step(placement.put_state(state)) == 7
    assert current_step({"step": np.int32(7), "w": np.ones(2)}) == 7  # a checkpoint's dict of arrays
    if mode != "pmap":  # (ensembles refuse pmap)
        assert current_step(placement.put_state(members)) == 7


# -------------------------------------------------------------------- steps
@pytest.mark.slow
def test_train_step_lowers_the_loss_and_counts_steps():
    ds = tiny_data()
    model, opt, state = setup()
    step = jax.jit(make_train_step(model, opt))
    batch = batch_of(ds, 64)
    first = None
    for _ in range(30):
        state, m = step(state, batch)
        first = first if first is not None else float(m["loss"])
    assert float(m["loss"]) < 0.5 * first
    assert int(state.step) == 30


@pytest.mark.slow
def test_jitted_step_equals_unjitted():
    ds = tiny_data()
    model, opt, state = setup(model=nn.serial(nn.flatten(), nn.dense(16), nn.relu, nn.dropout(0.3), nn.dense(3)))
    step = make_train_step(model, opt)
    s1, m1 = step(state, batch_of(ds))
    s2, m2 = jax.jit(step)(state, batch_of(ds))
    tree_allclose(s1.params, s2.params, rtol=1e-5, atol=1e-6)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)


@pytest.mark.slow
def test_step_keys_differ_per_step_and_are_reproducible():
    model = nn.serial(nn.dropout(0.5))
    _, opt, state = setup(model=nn.serial(nn.dense(3), nn.dropout(0.5)))
    seen = []

    def loss_fn(out, y):  # records the dropout mask via the output
        return jnp.mean(out, axis=-1)

    step = jax.jit(make_train_step(nn.serial(nn.dense(3), nn.dropout(0.5)), optax.sgd(0.0), loss_fn, lambda o, y: {"o": o}))
    x = {"x": jnp.ones((4, 8)), "y": jnp.zeros((4,), jnp.int32)}
    s = state.replace(opt_state=optax.sgd(0.0).init(state.params))
    for _ in range(3):
        s, m = step(s, x)
        seen.append(float(m["o"]))
    assert len(set(seen)) == 3
    s0 = state.replace(opt_state=optax.sgd(0.0).init(state.params))
    _, again = step(s0, x)
    assert float(again["o"]) == seen[0]


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch():
    ds = tiny_data()
    big = batch_of(ds, 64)
    model = models.mlp([16], 3)
    acc_opt = make_optimizer("sgd", 0.1, accumulate_steps=4)
    plain_opt = make_optimizer("sgd", 0.1)
    s_acc = create_train_state(model, acc_opt, KEY, (1, 8))
    s_one = create_train_state(model, plain_opt, KEY, (1, 8))
    step_acc = jax.jit(make_train_step(model, acc_opt))
    for k in range(4):
        s_acc, _ = step_acc(s_acc, {n: v[16 * k:16 * (k + 1)] for n, v in big.items()})
    s_one, _ = jax.jit(make_train_step(model, plain_opt))(s_one, big)
    tree_allclose(s_acc.params, s_one.params, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_per_example_gradients_with_vmap():
    model, _, state = setup()
    x = flat_random.normal(KEY, (5, 8))
    y = jnp.array([0, 1, 2, 0, 1])

    def loss(p, xi, yi):
        out, _ = model.apply(p, {}, xi[None])
        return softmax_cross_entropy(out, yi[None])[0]

    per_ex = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(state.params, x, y)
    for i in range(5):
        tree_allclose(jax.tree.map(lambda g: g[i], per_ex), jax.grad(loss)(state.params, x[i], y[i]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_vmapped_ensemble_of_train_states():
    model = models.mlp([16], 3)
    opt = optax.adam(1e-2)
    keys = jax.random.split(KEY, 3)
    states = jax.vmap(lambda k: create_train_state(model, opt, k, (1, 8)))(keys)
    ds = tiny_data()
    step = jax.jit(jax.vmap(make_train_step(model, opt), in_axes=(0, None)))
    states, m = step(states, batch_of(ds))
    assert m["loss"].shape == (3,)
    single = create_train_state(model, opt, keys[1], (1, 8))
    single, _ = make_train_step(model, opt)(single, batch_of(ds))
    tree_allclose(jax.tree.map(lambda a: a[1], states.params), single.params, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bfloat16_training_tracks_float32():
    """bfloat16 compute with float32 master params ends within 0.05 (absolute) of the
    float32 run's final loss on the same data -- the documented margin."""
    ds = tiny_data(n=512)
    model = models.mlp([32], 3)
    opt = optax.adam(1e-2)
    finals = {}
    for dtype in ("float32", "bfloat16"):
        state = create_train_state(model, opt, KEY, (1, 8))
        step = jax.jit(make_train_step(model, opt, compute_dtype=dtype))
        for i in range(60):
            state, m = step(state, batch_of(ds, 64, 64 * (i % 8)))
        assert jax.tree.leaves(state.params)[0].dtype == jnp.float32
        assert jax.tree.leaves(state.opt_state)[1].dtype == jnp.float32
        finals[dtype] = float(m["loss"])
    assert finals["float32"] < 0.6
    assert abs(finals["bfloat16"] - finals["float32"]) < 0.05, finals


# float16 (dynamic loss scaling): tests/test_loss_scale.py


# ------------------------------------------------------------- fused steps
@pytest.mark.slow
def test_fused_steps_equal_separate_steps():
    ds = tiny_data()
    model, opt, state = setup()
    step = make_train_step(model, opt)
    batches = [batch_of(ds, 32, 32 * i) for i in range(4)]
    s_sep = state
    single = jax.jit(step)
    for b in batches:
        s_sep, _ = single(s_sep, b)
    stacked = {k: jnp.stack([b[k] for b in batches]) for k in batches[0]}
    for unroll in (1, 2, True, 0, False):  # 0: fully unrolled (config spelling); False: rolled
        s_fused, metrics = jax.jit(make_multi_step(step, unroll=unroll))(state, stacked)
        assert metrics["loss"].shape == (4,)
        for a, b in zip(jax.tree.leaves(s_sep.params), jax.tree.leaves(s_fused.params)):
            if unroll is True or (unroll == 0 and unroll is not False):  # fully unrolled: rounding only
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
            else:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


FAMILIES = [(models.mlp([8], 3), (2, 5), "dense"),
            (models.cnn([2], [4], 3), (2, 6, 6, 1), "conv"),
            (models.rnn_classifier("gru", 4, 3), (2, 3, 2), "recurrent")]


@pytest.mark.slow
@pytest.mark.parametrize("model,shape,family", FAMILIES, ids=[f for _, _, f in FAMILIES])
def test_the_fusion_rule_reads_the_family_from_the_step_and_resolves_auto_once(model, shape, family):
    opt = optax.sgd(0.1)
    state = create_train_state(model, opt, 0, shape)
    step = make_train_step(model, opt)
    batch = {"x": jnp.ones(shape), "y": jnp.zeros(shape[0], jnp.int32)}
    assert step_family(step, state, batch) == family
    k = AUTO_STEPS_PER_CALL[family]
    assert resolve("auto", step, state, batch) == resolve(Fusion(), step, state, batch) == \
        (k, AUTO_UNROLL[family] if k > 1 else 1)
    assert resolve(Fusion(steps_per_call=5), step, state, batch) == (5, AUTO_UNROLL[family])
    assert resolve(Fusion(unroll=3), step, state, batch) == (k, 3 if k > 1 else 1)
    assert resolve(Fusion(4, 0), step, state, batch) == (4, True)  # 0: fully, as the config writes it
    assert resolve(Fusion(1, True), step, state, batch) == (1, 1)  # one step per call: nothing to unroll
    # a pmap step (built with axis_name) is traced under a named vmap
    pstep = make_train_step(model, opt, axis_name="batch")
    assert step_family(pstep, state, batch, axis_name="batch") == family


def test_the_measured_choices_stay_as_they_were():
    """The "auto" table is behaviour: dense steps fused 10 per dispatch and rolled, convolutions one
    per dispatch (fully unrolled when fused by hand), recurrent steps one per dispatch."""
    assert AUTO_STEPS_PER_CALL == {"conv": 1, "dense": 10, "recurrent": 1}
    assert AUTO_UNROLL == {"conv": True, "dense": 1, "recurrent": 1}


def test_fusion_settings_are_checked_where_they_are_made():
    for bad in (0, -1, 2.5, "4", True):
        with pytest.raises(ValueError, match="steps_per_call must be a positive int or 'auto'"):
            Fusion(steps_per_call=bad)
    for bad in (-1, 1.5, "full"):
        with pytest.raises(ValueError, match="unroll must be 'auto', a bool or an int >= 0"):
            Fusion(unroll=bad)
    with pytest.raises(ValueError, match="fusion must be 'auto' or a fundl.train.fusion.Fusion"):
        resolve("fast", None, None, None)
    with pytest.raises(ValueError, match="resolve turns 'auto' into one"):
        make_multi_step(lambda s, b: (s, {}), unroll="auto")


# --------------------------------------------------- optimisers, in a step
@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [("sgd", {"momentum": 0.9, "nesterov": True}), ("adam", {}), ("adamw", {}),
                                        ("rmsprop", {"momentum": 0.5}), ("lion", {})])
def test_optimizers_by_name_train(name, extra):
    ds = tiny_data()
    lr = 3e-3 if name == "lion" else 3e-2
    opt = make_optimizer(name, lr, weight_decay=1e-4, clip_norm=1.0, **extra)
    model, _, state = setup(opt)
    step = jax.jit(make_train_step(model, opt))
    losses = []
    for _ in range(25):
        state, m = step(state, batch_of(ds, 64))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]


def test_optimizer_errors_name_the_problem():
    with pytest.raises(ValueError, match="no optimiser named 'adamm'"):
        make_optimizer("adamm", 1e-3)
    with pytest.raises(ValueError, match="does not accept"):
        make_optimizer("adam", 1e-3, momentum=0.9)


@pytest.mark.parametrize("name,kw,at,want", [
    ("constant", {}, 50, 0.1),
    ("cosine", {}, 100, 0.0),
    ("cosine", {}, 50, 0.05),
    ("warmup_cosine", {"warmup_steps": 10}, 5, 0.05),
    ("exponential", {"decay_rate": 0.5, "transition_steps": 10}, 20, 0.025),
    ("piecewise", {"boundaries": [30, 60], "scales": [0.1, 0.5]}, 70, 0.005),
])
def test_schedules(name, kw, at, want):
    assert float(make_schedule(0.1, 100, name=name, **kw)(at)) == pytest.approx(want, rel=1e-4, abs=1e-7)


@pytest.mark.slow
def test_multi_step_auto_unroll_unrolls_only_convolutional_steps():
    """The auto fusion rule: convolutional steps fuse fully unrolled (equal to float32 rounding),
    dense and recurrent ones as a rolled scan (bit-identical to separate steps)."""
    for model, shape, conv in [(models.mlp([8], 3), (2, 5), False),
                               (models.cnn([2], [4], 3), (2, 6, 6, 1), True),
                               (models.rnn_classifier("gru", 4, 3), (2, 3, 2), False)]:
        opt = optax.sgd(0.1)
        state = create_train_state(model, opt, 0, shape)
        step = make_train_step(model, opt)
        batch = {"x": jnp.ones(shape), "y": jnp.zeros(shape[0], jnp.int32)}
        assert (step_family(step, state, batch) == "conv") is conv
        _, unroll = resolve(Fusion(steps_per_call=2), step, state, batch)
        stacked = jax.tree.map(lambda b: jnp.stack([b, b]), batch)
        auto, _ = jax.jit(make_multi_step(step, unroll=unroll))(state, stacked)
        ref = state
        for _ in range(2):
            ref, _ = jax.jit(step)(ref, batch)
        for a, b in zip(jax.tree.leaves(auto.params), jax.tree.leaves(ref.params)):
            if conv:  # fully unrolled: equal to float32 rounding
                assert jnp.allclose(a, b, rtol=1e-5, atol=1e-6)
            else:  # rolled: bit-identical
                assert jnp.array_equal(a, b)
