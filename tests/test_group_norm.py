"""Group norm: contract, a NumPy formula, PyTorch numerics, gradients, per-example
independence (what DP-SGD needs) and error messages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from fundl import nn
from layer_checks import check_layer

KEY = jax.random.key(0)


def rand(shape, seed=0, loc=0.0, scale=1.0):
    return (loc + scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def random_affine(params, seed=1):
    return {k: jnp.asarray(rand(v.shape, seed + i, loc=1.0 if k == "scale" else 0.0))
            for i, (k, v) in enumerate(sorted(params.items()))}


def np_group_norm(x, groups, scale, bias, eps=1e-5):
    """Channels-last group norm, written out with a loop over examples and groups."""
    x = np.asarray(x, np.float64)
    c = x.shape[-1]
    y = np.empty_like(x)
    for b in range(x.shape[0]):
        for g in range(groups):
            sl = (b, Ellipsis, slice(g * c // groups, (g + 1) * c // groups))
            part = x[sl]
            y[sl] = (part - part.mean()) / np.sqrt(part.var() + eps)
    if scale is not None:
        y = y * np.asarray(scale)
    if bias is not None:
        y = y + np.asarray(bias)
    return y


CASES = [  # (num_groups, input shape, kwargs)
    (2, (3, 6), {}),
    (3, (2, 7, 6), {}),
    (1, (2, 5, 4), {}),
    (4, (2, 5, 5, 4), {}),  # instance norm
    (2, (2, 4, 4, 6), {"use_scale": False}),
    (2, (2, 9, 4), {"use_bias": False, "eps": 1e-3}),
]


@pytest.mark.parametrize("groups,shape,kw", CASES, ids=[f"g{g}_{'x'.join(map(str, s))}" for g, s, _ in CASES])
def test_contract_and_numpy_reference(groups, shape, kw):
    layer = nn.group_norm(groups, **kw)
    check_layer(layer, shape)
    params, state, out = layer.init(KEY, shape)
    assert state == {} and out == shape
    assert all(v.shape == (shape[-1],) for v in params.values())
    params = random_affine(params)
    x = rand(shape, 4, loc=2.0, scale=3.0)
    y, new_state = layer.apply(params, state, jnp.asarray(x), train=True)
    assert new_state == {}
    ref = np_group_norm(x, groups, params.get("scale"), params.get("bias"), kw.get("eps", 1e-5))
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5)


def test_matches_torch():
    torch = pytest.importorskip("torch")
    for groups, shape in ((2, (2, 6)), (3, (2, 7, 6)), (2, (2, 5, 4, 6))):
        layer = nn.group_norm(groups)
        params = random_affine(layer.init(KEY, shape)[0])
        x = rand(shape, 9, loc=1.0, scale=2.0)
        y, _ = layer.apply(params, {}, jnp.asarray(x))
        mod = torch.nn.GroupNorm(groups, shape[-1], eps=1e-5)
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(np.array(params["scale"])))
            mod.bias.copy_(torch.from_numpy(np.array(params["bias"])))
            xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy())  # PyTorch is channels-first
            yt = np.moveaxis(mod(xt).numpy(), 1, -1)
        np.testing.assert_allclose(y, yt, rtol=1e-5, atol=1e-5)


def test_gradients_match_finite_differences():
    layer = nn.group_norm(2)
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v, jnp.float64) for k, v in random_affine(layer.init(KEY, (2, 3, 4))[0]).items()}
        x = jnp.asarray(rand((2, 3, 4), 5), jnp.float64)
        f = lambda p, x: layer.apply(p, {}, x)[0]
        check_grads(jax.jit(f), (params, x), order=2, modes=("fwd", "rev"), eps=1e-4, atol=1e-5, rtol=1e-5)


def test_examples_do_not_interact():
    """Each example's output is that of a batch of one: what per-example gradients need."""
    layer = nn.group_norm(2)
    params = random_affine(layer.init(KEY, (5, 6, 4))[0])
    x = jnp.asarray(rand((5, 6, 4), 2))
    y, _ = layer.apply(params, {}, x, train=True)
    for i in range(5):
        yi, _ = layer.apply(params, {}, x[i:i + 1], train=True)
        np.testing.assert_allclose(y[i:i + 1], yi, rtol=1e-6, atol=1e-6)


def test_bfloat16_input_computes_statistics_in_float32():
    layer = nn.group_norm(2)
    params, state, _ = layer.init(KEY, (2, 64))
    x32 = jnp.asarray(rand((2, 64), 3, loc=100.0, scale=0.5)).astype(jnp.bfloat16).astype(jnp.float32)
    y16, _ = layer.apply(params, state, x32.astype(jnp.bfloat16))
    y32, _ = layer.apply(params, state, x32)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=1e-2, atol=1e-2)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        nn.group_norm(0)
    with pytest.raises(nn.ShapeError, match=r"6 channels .* do not split into 4 groups"):
        nn.group_norm(4).init(KEY, (2, 6))
    with pytest.raises(nn.ShapeError, match="rank >= 2"):
        nn.group_norm(1).init(KEY, (6,))
    layer = nn.group_norm(2)
    params, state, _ = layer.init(KEY, (2, 6))
    with pytest.raises(nn.ShapeError, match=r"expected input of shape \(batch, \.\.\., 6\).*\(2, 4\)"):
        layer.apply(params, state, jnp.ones((2, 4)))
    with pytest.raises(nn.ShapeError, match=r"at layer 'group_norm_0'.*5 channels"):
        nn.serial(nn.dense(5), nn.group_norm(2)).init(KEY, (2, 3))
