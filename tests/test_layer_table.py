"""One table of every layer and model with an example input, each run through
the generic contract checks (init/apply shape agreement, abstract init, jit,
vmap, grad, no recompilation); plus dense/embedding/dropout references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fundl import models, nn
from fundl.nn import flat_random
from layer_checks import check_layer

F32, I32 = jnp.float32, jnp.int32


def cross_attention(layer: nn.Layer, t: int) -> nn.Layer:
    """Cross-attention as a one-input layer for the table: the first ``t`` positions attend to the rest."""
    split = lambda x: {"x": x[:, :t], "context": x[:, t:]}

    def init(key, shape):
        return layer.init(key, {"x": (shape[0], t, shape[2]), "context": (shape[0], shape[1] - t, shape[2])})

    def apply(params, state, x, *, key=None, train=False):
        return layer.apply(params, state, split(x), key=key, train=train)

    return nn.Layer(init, apply, "cross_attention")


# name -> (layer, input shape incl. batch, dtype, kwargs for check_layer)
TABLE = {
    "dense": (nn.dense(7), (3, 5), F32, {}),
    "dense_rank3": (nn.dense(4, use_bias=False), (2, 3, 5), F32, {}),
    "embedding": (nn.embedding(11, 6), (3, 5), I32, {"maxval": 11}),
    "flatten": (nn.flatten(), (2, 3, 4, 5), F32, {}),
    "reshape": (nn.reshape((6, -1)), (2, 3, 4), F32, {}),
    "dropout_train": (nn.dropout(0.5), (4, 6), F32, {"train": True}),
    "dropout_eval": (nn.dropout(0.5), (4, 6), F32, {}),
    **{act: (getattr(nn, act), (3, 4), F32, {}) for act in
       ("relu", "gelu", "silu", "tanh", "sigmoid", "softplus", "elu", "identity")},
    "leaky_relu": (nn.leaky_relu(0.2), (3, 4), F32, {}),
    "softmax": (nn.softmax(), (3, 4), F32, {}),
    "log_softmax": (nn.log_softmax(), (3, 4), F32, {}),
    "conv1d": (nn.conv1d(4, 3, stride=2), (2, 9, 3), F32, {}),
    "conv2d": (nn.conv2d(4, (3, 2), padding="VALID", dilation=(1, 2)), (2, 7, 8, 3), F32, {}),
    "conv2d_groups": (nn.conv2d(4, 3, feature_group_count=2), (2, 6, 6, 4), F32, {}),
    "max_pool1d": (nn.max_pool1d(2), (2, 8, 3), F32, {}),
    "avg_pool1d": (nn.avg_pool1d(3, 2, padding="SAME"), (2, 8, 3), F32, {}),
    "max_pool2d": (nn.max_pool2d(2), (2, 6, 6, 3), F32, {}),
    "avg_pool2d": (nn.avg_pool2d(2), (2, 6, 6, 3), F32, {}),
    "global_avg_pool": (nn.global_avg_pool(), (2, 5, 5, 3), F32, {}),
    "layer_norm": (nn.layer_norm(), (3, 6), F32, {}),
    "group_norm": (nn.group_norm(2), (2, 5, 4), F32, {}),
    "batch_norm_train": (nn.batch_norm(), (6, 4), F32, {"train": True}),
    "batch_norm_eval": (nn.batch_norm(), (6, 4), F32, {}),
    "rms_norm": (nn.rms_norm(), (3, 4, 6), F32, {}),
    "multi_head_attention": (nn.multi_head_attention(4, num_kv_heads=2, causal=True, rope=True), (2, 5, 8), F32, {}),
    "multi_head_attention_dropout": (nn.multi_head_attention(2, dropout=0.3), (2, 5, 8), F32, {"train": True}),
    "cross_attention": (cross_attention(nn.multi_head_attention(2, num_kv_heads=1), 3), (2, 7, 8), F32, {}),
    "learned_positions": (nn.learned_positions(8), (2, 5, 4), F32, {}),
    "rotary": (nn.rotary(), (2, 5, 2, 4), F32, {}),
    "transformer_block": (nn.transformer_block(2, dropout=0.1), (2, 5, 8), F32, {"train": True}),
    "transformer_block_llama": (nn.transformer_block(4, num_kv_heads=1, mlp="swiglu", norm="rms", rope=True),
                                (2, 5, 8), F32, {}),
    "tied_embedding": (nn.tied_embedding(11, 6, nn.dense(6), nn.layer_norm()), (2, 5), I32, {"maxval": 11}),
    "lstm": (nn.lstm(8), (2, 5, 3), F32, {}),
    "gru": (nn.gru(8), (2, 5, 3), F32, {}),
    "lstm_bidirectional_stacked": (nn.lstm(6, num_layers=2, bidirectional=True), (2, 5, 3), F32, {}),
    "gru_time_major_reverse": (nn.gru(6, time_major=True, reverse=True), (5, 2, 3), F32, {}),
    "serial": (nn.serial(nn.dense(8), nn.relu, nn.dense(2)), (3, 4), F32, {}),
    "residual": (nn.residual(nn.layer_norm(), nn.dense(4)), (3, 4), F32, {}),
    "parallel_concat": (nn.parallel(nn.dense(3), nn.dense(2), merge="concat"), (3, 4), F32, {}),
    "mlp": (models.mlp([16], 10, dropout=0.1), (2, 28, 28, 1), F32, {"train": True}),
    "cnn": (models.cnn([4, 8], [16], 10, batch_norm=True), (2, 12, 12, 1), F32, {"train": True}),
    "cnn1d": (models.cnn1d([4, 4], [], 10, stride=2, pool="none"), (2, 40, 1), F32, {}),
    "rnn_classifier": (models.rnn_classifier("gru", 8, 10, readout="mean"), (2, 6, 1), F32, {}),
    "char_lm": (models.char_lm(13, embed_dim=4, hidden=8), (2, 6), I32, {"maxval": 13}),
    "gpt": (models.gpt(13, context=8, layers=2, heads=2, width=16, dropout=0.1), (2, 6), I32,
            {"maxval": 13, "train": True}),
}


# Entries whose checks compile the most (convolutions, recurrent stacks, attention, whole models):
# in `make test`, not in test-fast, which keeps one cheap entry of each kind.
SLOW = {"conv2d", "conv2d_groups", "conv1d", "dropout_train", "layer_norm", "group_norm",
        "lstm_bidirectional_stacked", "gru_time_major_reverse", "multi_head_attention",
        "multi_head_attention_dropout", "cross_attention", "transformer_block", "transformer_block_llama",
        "mlp", "cnn", "cnn1d", "rnn_classifier", "char_lm", "gpt"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(TABLE)])
def test_layer_contract(name):
    layer, shape, dtype, kw = TABLE[name]
    check_layer(layer, shape, dtype=dtype, **kw)


def test_dense_matches_numpy():
    layer = nn.dense(3)
    params, _, _ = layer.init(jax.random.key(1), (2, 4))
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    y, _ = layer.apply(params, {}, x)
    np.testing.assert_allclose(y, x @ np.asarray(params["w"]) + np.asarray(params["b"]), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_dense_gradients_by_finite_differences():
    from jax.test_util import check_grads

    layer = nn.dense(3)
    params, _, _ = layer.init(jax.random.key(1), (2, 4))
    x = flat_random.normal(jax.random.key(2), (2, 4))
    check_grads(lambda p, x: layer.apply(p, {}, x)[0], (params, x), order=2, modes=["rev"], eps=1e-2, atol=2e-2, rtol=2e-2)


@pytest.mark.slow
def test_dense_matches_torch():
    torch = pytest.importorskip("torch")
    lin = torch.nn.Linear(5, 3)
    params = {"w": jnp.asarray(lin.weight.detach().numpy().T), "b": jnp.asarray(lin.bias.detach().numpy())}
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    y, _ = nn.dense(3).apply(params, {}, x)
    np.testing.assert_allclose(y, lin(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


def test_embedding_looks_up_rows():
    layer = nn.embedding(5, 2)
    params, _, _ = layer.init(jax.random.key(0), (1, 3))
    ids = jnp.array([[4, 0, 2]])
    y, _ = layer.apply(params, {}, ids)
    np.testing.assert_array_equal(y[0], np.asarray(params["w"])[[4, 0, 2]])
    with pytest.raises(nn.ShapeError, match="integer ids"):
        layer.apply(params, {}, jnp.zeros((1, 3)))


def test_dropout_rate_is_the_drop_probability_and_scales():
    x = jnp.ones((200, 100))
    y, _ = nn.dropout(0.3).apply({}, {}, x, key=jax.random.key(0), train=True)
    kept = np.asarray(y) != 0
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.7, rtol=1e-6)
    y_eval, _ = nn.dropout(0.3).apply({}, {}, x)
    np.testing.assert_array_equal(y_eval, x)


def test_dropout_without_key_in_training_is_a_clear_error():
    model = nn.serial(nn.dense(4), nn.dropout(0.5))
    params, _, _ = model.init(jax.random.key(0), (1, 3))
    with pytest.raises(nn.KeyMissingError, match=r"dropout_0.*needs a PRNG key"):
        model.apply(params, {}, jnp.ones((2, 3)), train=True)
    with pytest.raises(ValueError, match="drop probability"):
        nn.dropout(1.0)


def test_summary_prints_paths_shapes_and_returns_total():
    lines = []
    total = nn.summary(models.mlp([128], 10), (1, 784), print_fn=lines.append)
    text = "\n".join(lines)
    assert total == 784 * 128 + 128 + 128 * 10 + 10 == 101_770
    assert "dense_0" in text and "(1, 128)" in text and "101,770" in text


NUMPY_ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "softplus": lambda x: np.log1p(np.exp(x)),
    "silu": lambda x: x / (1 + np.exp(-x)),
    "elu": lambda x: np.where(x > 0, x, np.expm1(x)),
    "gelu": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),  # tanh approximation
    "identity": lambda x: x,
}


@pytest.mark.parametrize("name", sorted(NUMPY_ACTIVATIONS))
def test_activations_match_numpy(name):
    x = np.linspace(-4, 4, 33, dtype=np.float32).reshape(3, 11)
    y, _ = getattr(nn, name).apply({}, {}, jnp.asarray(x))
    np.testing.assert_allclose(y, NUMPY_ACTIVATIONS[name](x.astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_parameterised_activations_match_numpy():
    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(2, 6)
    np.testing.assert_allclose(nn.leaky_relu(0.2).apply({}, {}, x)[0], np.where(x > 0, x, 0.2 * x), rtol=1e-6)
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(nn.softmax().apply({}, {}, x)[0], e / e.sum(-1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(nn.log_softmax().apply({}, {}, x)[0], np.log(e / e.sum(-1, keepdims=True)), rtol=1e-5, atol=1e-6)


def test_flatten_and_reshape_match_numpy():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(nn.flatten().apply({}, {}, x)[0], x.reshape(2, 12))
    np.testing.assert_array_equal(nn.reshape((4, 3)).apply({}, {}, x)[0], x.reshape(2, 4, 3))
    with pytest.raises(nn.ShapeError, match="cannot reshape"):
        nn.reshape((5, 5)).init(None, (2, 3, 4))
    with pytest.raises(nn.ShapeError, match="batch axis"):
        nn.flatten().apply({}, {}, jnp.ones((4,)))
