"""fundl.models: where dropout acts (hidden features, never raw inputs unless asked)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fundl import models, nn
from fundl.nn import flat_random
from fundl.nn.children import record_shapes

KEY = jax.random.key(0)


def _init(model, shape):
    params, state, _ = model.init(KEY, shape)
    return params, state


@pytest.mark.slow
def test_mlp_dropout_acts_after_hidden_activations_not_on_inputs():
    """With dense_1 = identity the output is the dropped hidden layer: each entry is 0 or
    2 * relu(x @ w0 + b0) computed from the *undropped* inputs."""
    model = models.mlp([16], 16, dropout=0.5)
    params, state = _init(model, (1, 12))
    params["dense_1"] = {"w": jnp.eye(16), "b": jnp.zeros(16)}
    x = flat_random.normal(jax.random.key(1), (8, 12))
    y, _ = model.apply(params, state, x, key=jax.random.key(2), train=True)
    h = jax.nn.relu(x @ params["dense_0"]["w"] + params["dense_0"]["b"])
    dropped = y == 0
    np.testing.assert_allclose(np.where(dropped, 0.0, y), np.where(dropped, 0.0, 2 * h), rtol=1e-6)
    assert 0.2 < float(jnp.mean(dropped & (h > 0))) / float(jnp.mean(h > 0)) < 0.8  # hidden dropout happens


@pytest.mark.slow
def test_mlp_input_dropout_drops_flattened_inputs_only_when_asked():
    model = models.mlp([], 12, input_dropout=0.5)  # one dense layer, set to the identity
    params, state = _init(model, (1, 3, 4))
    params["dense_0"] = {"w": jnp.eye(12), "b": jnp.zeros(12)}
    x = flat_random.normal(jax.random.key(1), (8, 3, 4)) + 5.0  # no zeros of its own
    flat = x.reshape(8, 12)
    y, _ = model.apply(params, state, x, key=jax.random.key(2), train=True)
    kept = y != 0
    np.testing.assert_allclose(y[kept], 2 * flat[kept], rtol=1e-6)
    assert 0.3 < float(jnp.mean(kept)) < 0.7
    y_eval, _ = model.apply(params, state, x)
    np.testing.assert_allclose(y_eval, flat, rtol=1e-6)
    plain = models.mlp([], 12, dropout=0.5)  # no hidden layer: nothing to drop
    np.testing.assert_allclose(plain.apply(params, state, x, key=jax.random.key(2), train=True)[0], flat, rtol=1e-6)


def _paths(model, shape):
    with record_shapes() as rows:
        nn.abstract_init(model, shape)
    return [path for path, _ in rows]


def test_cnn_dropout_acts_on_features_never_on_raw_inputs():
    paths = _paths(models.cnn([4], [8], 3, dropout=0.5), (1, 8, 8, 1))
    assert paths == ["conv2d_0", "relu_0", "avg_pool2d_0", "flatten_0", "dropout_0",
                     "dense_0", "relu_1", "dropout_1", "dense_1"]


@pytest.mark.slow
@pytest.mark.parametrize("make,shape,x", [
    (lambda d: models.rnn_classifier("lstm", 16, 10, num_layers=1, dropout=d), (1, 6, 4),
     flat_random.normal(KEY, (3, 6, 4))),
    (lambda d: models.rnn_classifier("gru", 16, 10, readout="mean", dropout=d), (1, 6, 4),
     flat_random.normal(KEY, (3, 6, 4))),
    (lambda d: models.char_lm(11, embed_dim=8, hidden=16, dropout=d), (1, 6),
     jnp.arange(18).reshape(3, 6) % 11),
], ids=["rnn_lstm_last", "rnn_gru_mean", "char_lm"])
def test_one_layer_rnn_models_take_dropout(make, shape, x):
    """model.dropout on a one-layer RNN drops the RNN's outputs before the readout."""
    model = make(0.1)
    params, state = _init(model, shape)
    plain_params, _ = _init(make(0.0), shape)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, plain_params)  # checkpoints still fit
    y_eval, _ = model.apply(params, state, x)
    np.testing.assert_array_equal(y_eval, make(0.0).apply(params, state, x)[0])
    y_train, _ = model.apply(params, state, x, key=jax.random.key(1), train=True)
    assert y_train.shape == y_eval.shape and not np.allclose(y_train, y_eval)
    with pytest.raises(nn.KeyMissingError, match="PRNG key"):
        model.apply(params, state, x, train=True)


def test_stacked_rnn_model_drops_between_layers_and_before_readout():
    paths = _paths(models.rnn_classifier("lstm", 8, 3, num_layers=2, dropout=0.2), (1, 5, 4))
    assert paths[-2:] == ["dropout_0", "dense_0"]
    assert "lstm/layer_1" in paths
