"""The layer contract, combinators and their error messages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fundl import nn
from fundl.nn import flat_random
from layer_checks import check_layer


KEY = jax.random.key(0)


def mlp():
    return nn.serial(nn.dense(16), nn.relu, nn.dense(3))


def test_serial_names_children_per_kind():
    params, state, out = mlp().init(KEY, (2, 5))
    assert set(params) == {"dense_0", "dense_1"}
    assert state == {}
    assert out == (2, 3)


def test_serial_matches_manual_composition():
    params, _, _ = mlp().init(KEY, (2, 5))
    x = flat_random.normal(KEY, (4, 5))
    y, _ = mlp().apply(params, {}, x)
    d0, d1 = params["dense_0"], params["dense_1"]
    ref = np.maximum(np.asarray(x) @ d0["w"] + d0["b"], 0) @ d1["w"] + d1["b"]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_named_child_keeps_its_name():
    model = nn.serial(nn.named("encoder", nn.dense(4)), nn.named("head", nn.dense(2)))
    params, _, _ = model.init(KEY, (1, 3))
    assert set(params) == {"encoder", "head"}


def test_duplicate_names_are_rejected():
    with pytest.raises(ValueError, match="share the name"):
        nn.serial(nn.named("a", nn.dense(2)), nn.named("a", nn.dense(2)))


def test_non_layer_child_is_a_clear_type_error():
    with pytest.raises(TypeError, match="expected a fundl Layer"):
        nn.serial(nn.dense(2), jax.nn.relu)


@pytest.mark.parametrize("merge,out", [("add", (2, 4)), ("concat", (2, 7)), ("tuple", ((2, 4), (2, 3)))])
def test_parallel_merges(merge, out):
    branches = (nn.dense(4), nn.dense(4)) if merge == "add" else (nn.dense(4), nn.dense(3))
    layer = nn.parallel(*branches, merge=merge)
    check_layer(layer, (2, 5))
    assert layer.init(KEY, (2, 5))[2] == out


def test_residual_adds_input():
    layer = nn.residual(nn.dense(5), nn.tanh)
    params, _, _ = check_layer(layer, (3, 5))
    x = jnp.ones((3, 5))
    y, _ = layer.apply(params, {}, x)
    inner, _ = nn.serial(nn.dense(5), nn.tanh).apply(params, {}, x)
    np.testing.assert_allclose(y, x + inner, rtol=1e-6)


def test_residual_rejects_shape_change():
    with pytest.raises(nn.ShapeError, match="keep the input shape"):
        nn.residual(nn.dense(4)).init(KEY, (3, 5))


def test_wrong_input_shape_names_layer_path_expected_and_got():
    model = nn.serial(nn.named("encoder", nn.serial(nn.dense(8), nn.relu, nn.dense(4))), nn.dense(2))
    params, _, _ = model.init(KEY, (1, 6))
    with pytest.raises(nn.ShapeError) as err:
        model.apply(params, {}, jnp.ones((2, 7)))
    msg = str(err.value)
    assert "encoder/dense_0" in msg and "(..., 6)" in msg and "(2, 7)" in msg


def test_wrong_shape_error_also_raised_under_jit():
    model = mlp()
    params, _, _ = model.init(KEY, (1, 5))
    with pytest.raises(nn.ShapeError, match="dense_0"):
        jax.jit(lambda p, x: model.apply(p, {}, x))(params, jnp.ones((2, 6)))


def test_params_structure_mismatch_shows_first_differing_path():
    model = nn.serial(nn.named("encoder", mlp()), nn.dense(2))
    params, _, _ = model.init(KEY, (1, 5))
    bad = {"encoder": {"dense_0": params["encoder"]["dense_0"], "dense_9": {}}, "dense_0": params["dense_0"]}
    with pytest.raises(nn.ParamsError, match=r"encoder.*unexpected params entries \['dense_9'\]"):
        model.apply(bad, {}, jnp.ones((2, 5)))
    del params["encoder"]["dense_1"]["w"]
    with pytest.raises(nn.ParamsError, match=r"encoder/dense_1.*missing params entry 'w'"):
        model.apply(params, {}, jnp.ones((2, 5)))


def test_lambda_layer_infers_shape():
    layer = nn.lambda_layer(lambda x: x[:, ::2] * 2, "half")
    check_layer(layer, (3, 8))
    assert layer.init(KEY, (3, 8))[2] == (3, 4)


def test_relu_equals_jax_nn_relu_values_and_gradient_at_the_edges():
    """nn.relu is a select (XLA:CPU fuses it better than ``max(x, 0)``); its values equal
    jax.nn.relu's on every edge value, NaN passes through, and the gradient is 0 at 0."""
    x = jnp.array([-jnp.inf, -2.0, -0.0, 0.0, 1e-30, 3.0, jnp.inf, jnp.nan])
    got = nn.relu.apply({}, {}, x)[0]
    np.testing.assert_array_equal(got, jax.nn.relu(x))
    grad = jax.vmap(jax.grad(lambda v: nn.relu.apply({}, {}, v)[0]))(x[:-1])
    np.testing.assert_array_equal(grad, jax.vmap(jax.grad(jax.nn.relu))(x[:-1]))
