"""Per-example gradients: equal to a Python loop of single-example gradients for
dense, convolutional and recurrent models (with dropout keys too), and a clear
error for models whose layers couple the examples of a batch (batch norm)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fundl import models, nn
from fundl.losses import softmax_cross_entropy
from fundl.transforms import ExampleCouplingError, model_loss, per_example_grads

KEY = jax.random.key(0)


def data(shape, n=5, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": jnp.asarray(rng.normal(size=(n,) + shape), jnp.float32),
            "y": jnp.asarray(rng.integers(0, classes, n), jnp.int32)}


def loop_grads(model, params, state, batch, *, key=None, train=True):
    """The reference: jax.grad of each example's loss, one example (a batch of one) at a time."""
    out = []
    for i in range(len(batch["y"])):
        k = None if key is None else jax.random.fold_in(key, i)

        def loss(p):
            logits, _ = model.apply(p, state, batch["x"][i:i + 1], key=k, train=train)
            return softmax_cross_entropy(logits, batch["y"][i:i + 1]).mean()

        out.append(jax.grad(loss)(params))
    return jax.tree.map(lambda *g: jnp.stack(g), *out)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


MODELS = {
    "mlp": (lambda: models.mlp([16, 8], 10), (12,)),
    "cnn1d": (lambda: models.cnn1d([4, 6], [8], 10), (16, 1)),
    "cnn1d_group_norm": (lambda: nn.serial(nn.conv1d(6, 3), nn.group_norm(2), nn.relu, nn.flatten(), nn.dense(10)),
                         (8, 2)),
    "gru": (lambda: models.rnn_classifier("gru", 8, 10), (6, 3)),
    "layer_norm_mlp": (lambda: nn.serial(nn.dense(8), nn.layer_norm(), nn.relu, nn.dense(10)), (5,)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_equals_a_loop_of_single_example_gradients(name):
    build, shape = MODELS[name]
    model = build()
    params, state, _ = model.init(KEY, (1,) + shape)
    batch = data(shape)
    got, new_state = jax.jit(lambda p, s, b: per_example_grads(model_loss(model), p, b, model_state=s))(
        params, state, batch)
    assert_trees_close(got, loop_grads(model, params, state, batch))
    assert jax.tree.map(jnp.shape, got) == jax.tree.map(lambda p: (5,) + p.shape, params)
    assert_trees_close(new_state, state)


@pytest.mark.slow
def test_dropout_key_is_folded_per_example():
    model = models.mlp([32], 10, dropout=0.5)
    params, state, _ = model.init(KEY, (1, 12))
    batch, key = data((12,)), jax.random.key(7)
    got, _ = per_example_grads(model_loss(model), params, batch, model_state=state, key=key)
    assert_trees_close(got, loop_grads(model, params, state, batch, key=key))
    # examples draw different masks (a shared key would drop the same units for every example)
    w = np.asarray(got["dense_0"]["w"])
    assert not np.array_equal(w[0] != 0, w[1] != 0)


@pytest.mark.slow
def test_plain_loss_function_and_aux():
    """Without model state: loss_fn(params, example) -> loss or (loss, aux), like jax.grad."""
    w = jnp.arange(6.0).reshape(3, 2) / 10
    batch = {"x": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32),
             "t": jnp.arange(4.0)}

    def loss(w, ex):
        assert ex["x"].shape == (1, 3)  # a batch of one
        r = ex["x"] @ w
        return jnp.sum(r ** 2) - ex["t"][0], r[0]

    grads, aux = per_example_grads(loss, w, batch, has_aux=True)
    for i in range(4):
        ex = jax.tree.map(lambda a: a[i:i + 1], batch)
        g_i, r_i = jax.grad(loss, has_aux=True)(w, ex)
        np.testing.assert_allclose(grads[i], g_i, rtol=1e-6)
        np.testing.assert_allclose(aux[i], r_i, rtol=1e-6)
    only = per_example_grads(lambda w, ex: loss(w, ex)[0], w, batch)
    np.testing.assert_allclose(only, grads, rtol=1e-6)


@pytest.mark.slow
def test_batch_norm_in_training_is_a_clear_error_naming_the_layer():
    model = models.cnn1d([4], [8], 10, batch_norm=True)
    params, state, _ = model.init(KEY, (1, 16, 1))
    batch = data((16, 1))
    with pytest.raises(ExampleCouplingError) as err:
        jax.jit(lambda p, s, b: per_example_grads(model_loss(model), p, b, model_state=s))(params, state, batch)
    msg = str(err.value)
    assert "batch_norm_0" in msg and "nn.layer_norm" in msg and "nn.group_norm" in msg, msg
    assert isinstance(err.value, nn.LayerError)  # the scripts print it without a traceback


@pytest.mark.slow
def test_nested_batch_norm_is_named_by_its_path():
    block = nn.named("encoder", nn.serial(nn.dense(8), nn.batch_norm(), nn.relu))
    model = nn.serial(block, nn.dense(10))
    params, state, _ = model.init(KEY, (1, 5))
    with pytest.raises(ExampleCouplingError, match=r"at layer 'encoder/batch_norm_0'"):
        per_example_grads(model_loss(model), params, data((5,)), model_state=state)


@pytest.mark.slow
def test_batch_norm_with_frozen_statistics_is_allowed():
    """train=False reads the running statistics only: examples do not interact."""
    model = nn.serial(nn.dense(8), nn.batch_norm(), nn.relu, nn.dense(10))
    params, state, _ = model.init(KEY, (1, 5))
    state = jax.tree.map(lambda a: a + 0.5, state)
    batch = data((5,))
    got, new_state = per_example_grads(model_loss(model, train=False), params, batch, model_state=state)
    assert_trees_close(got, loop_grads(model, params, state, batch, train=False))
    assert_trees_close(new_state, state)


def test_batch_axis_must_agree():
    with pytest.raises(ValueError, match="same leading"):
        per_example_grads(lambda p, b: jnp.sum(p * b["x"]), jnp.ones(3), {"x": jnp.ones((4, 3)), "y": jnp.ones(5)})


def test_global_norms_is_each_examples_norm_over_the_whole_tree():
    """Exported from fundl.transforms: one L2 norm per example over every leaf of the tree."""
    from fundl.transforms import global_norms

    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(size=(3, 4, 5)).astype(np.float32), "b": {"c": rng.normal(size=(3, 2)).astype(np.float32)}}
    want = [np.sqrt(np.sum(grads["a"][i] ** 2) + np.sum(grads["b"]["c"][i] ** 2)) for i in range(3)]
    np.testing.assert_allclose(np.asarray(global_norms(grads)), want, rtol=1e-6)
