"""Layer norm, batch norm and group norm: contract, NumPy formulas, gradients, PyTorch
numerics, cross-device statistics with ``axis_name`` (batch norm), per-example
independence (group norm, what DP-SGD needs) and error messages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from fundl import nn
from fundl.nn.norm import batch_norm, layer_norm
from layer_checks import check_layer

KEY = jax.random.key(0)


def rand(shape, seed=0, loc=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (loc + scale * rng.standard_normal(shape)).astype(np.float32)


def with_random_affine(params, seed=1):
    """Replace ones/zeros scale and bias by random values (so they are tested)."""
    return {k: jnp.asarray(rand(v.shape, seed + i, loc=1.0 if k == "scale" else 0.0))
            for i, (k, v) in enumerate(sorted(params.items()))}


# --------------------------------------------------------------------------
# NumPy formulas.


def np_layer_norm(x, axes, scale, bias, eps):
    x = x.astype(np.float64)
    mean = x.mean(axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
    if scale is not None:
        y = y * np.reshape(scale, shape)
    if bias is not None:
        y = y + np.reshape(bias, shape)
    return y


def np_batch_norm_train(x, scale, bias, mean_r, var_r, momentum, eps):
    x = x.astype(np.float64).reshape(-1, x.shape[-1])
    n = x.shape[0]
    mean = x.mean(0)
    var = x.var(0)  # biased, for normalisation
    y = (x - mean) / np.sqrt(var + eps) * scale + bias
    new_mean = momentum * mean_r + (1 - momentum) * mean
    new_var = momentum * var_r + (1 - momentum) * var * n / (n - 1)  # unbiased
    return y, new_mean, new_var


# --------------------------------------------------------------------------
# Layer norm.

# The cases share input shapes: check_layer draws its inputs with jax.random,
# which compiles once per shape.
LN_CASES = [
    ("last", dict(), (2, 3, 4)),
    ("last_2d", dict(eps=1e-3), (4, 3)),
    ("two_axes", dict(axis=(-2, -1)), (2, 3, 4)),
    ("middle_axis", dict(axis=1), (2, 3, 4)),
    ("no_scale", dict(use_scale=False), (2, 3, 4)),
    ("no_affine", dict(use_scale=False, use_bias=False), (2, 3, 4)),
]


LN_CONTRACT = {"last", "two_axes", "middle_axis", "no_affine"}


@pytest.mark.slow
@pytest.mark.parametrize("cid,kw,shape", LN_CASES, ids=[c[0] for c in LN_CASES])
def test_layer_norm_contract_and_numpy_reference(cid, kw, shape):
    layer = layer_norm(**kw)
    if cid in LN_CONTRACT:
        params, state, _ = check_layer(layer, shape)
    else:  # check_layer compiles every layer it checks: a subset suffices
        params, state, out = layer.init(KEY, shape)
        assert out == shape
    assert state == {}
    axis = kw.get("axis", -1)
    axes = tuple(sorted(a % len(shape) for a in ((axis,) if isinstance(axis, int) else axis)))
    feat = tuple(shape[a] for a in axes)
    assert set(params) == {k for k, on in (("scale", kw.get("use_scale", True)),
                                           ("bias", kw.get("use_bias", True))) if on}
    for v in params.values():
        assert v.shape == feat
    np.testing.assert_array_equal(params.get("scale", jnp.ones(feat)), 1)
    np.testing.assert_array_equal(params.get("bias", jnp.zeros(feat)), 0)

    params = with_random_affine(params)
    x = rand(shape, 7, loc=3.0, scale=2.0)
    y, _ = layer.apply(params, state, jnp.asarray(x))
    ref = np_layer_norm(x, axes, params.get("scale"), params.get("bias"), kw.get("eps", 1e-5))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_layer_norm_bfloat16_computes_in_float32():
    layer = layer_norm()
    params, state, _ = layer.init(KEY, (4, 64))
    x32 = jnp.asarray(rand((4, 64), 3, loc=100.0, scale=0.5)).astype(jnp.bfloat16).astype(jnp.float32)
    y16, _ = layer.apply(params, state, x32.astype(jnp.bfloat16))
    y32, _ = layer.apply(params, state, x32)
    assert y16.dtype == jnp.bfloat16
    # same input values: the only difference is rounding the output to bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_layer_norm_gradients_match_finite_differences():
    layer = layer_norm(axis=(-2, -1))
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v, jnp.float64)
                  for k, v in with_random_affine(layer.init(KEY, (2, 3, 4))[0]).items()}
        x = jnp.asarray(rand((2, 3, 4), 5), jnp.float64)
        f = lambda p, x: layer.apply(p, {}, x)[0]
        check_grads(jax.jit(f), (params, x), order=2, modes=("fwd", "rev"), eps=1e-4, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_layer_norm_matches_torch():
    torch = pytest.importorskip("torch")
    x = rand((2, 3, 4, 6), 8, loc=1.0, scale=3.0)
    for axis, normalized_shape in ((-1, (6,)), ((-2, -1), (4, 6))):
        layer = layer_norm(axis=axis, eps=1e-5)
        params = with_random_affine(layer.init(KEY, x.shape)[0])
        y, _ = layer.apply(params, {}, jnp.asarray(x))
        mod = torch.nn.LayerNorm(normalized_shape, eps=1e-5)
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(np.array(params["scale"])))
            mod.bias.copy_(torch.from_numpy(np.array(params["bias"])))
            yt = mod(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(y, yt, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------
# Batch norm.

BN_CASES = [
    ("2d_train", dict(), (4, 3), True),
    ("2d_eval", dict(), (4, 3), False),
    ("nwc_train", dict(momentum=0.8), (2, 3, 4), True),
    ("nhwc_no_affine_train", dict(use_scale=False, use_bias=False), (2, 3, 2, 4), True),
]


@pytest.mark.slow
@pytest.mark.parametrize("cid,kw,shape,train", BN_CASES, ids=[c[0] for c in BN_CASES])
def test_batch_norm_contract(cid, kw, shape, train):
    layer = batch_norm(**kw)
    params, state, _ = check_layer(layer, shape, train=train)
    c = shape[-1]
    assert jax.tree.map(jnp.shape, state) == {"mean": (c,), "var": (c,)}
    np.testing.assert_array_equal(state["mean"], 0)
    np.testing.assert_array_equal(state["var"], 1)
    affine = kw.get("use_scale", True)
    assert jax.tree.map(jnp.shape, params) == ({"scale": (c,), "bias": (c,)} if affine else {})


@pytest.mark.parametrize("shape", [(6, 3), (2, 4, 5, 3)])
def test_batch_norm_train_matches_numpy(shape):
    momentum, eps = 0.7, 1e-3
    layer = batch_norm(momentum=momentum, eps=eps)
    params, state, _ = nn.abstract_init(layer, shape)
    params = with_random_affine(params)
    state = {"mean": jnp.asarray(rand((3,), 4)), "var": jnp.asarray(rand((3,), 5) ** 2 + 0.5)}
    x = rand(shape, 6, loc=2.0, scale=3.0)
    y, new_state = jax.jit(lambda p, s, x: layer.apply(p, s, x, train=True))(params, state, jnp.asarray(x))
    ref_y, ref_mean, ref_var = np_batch_norm_train(
        x, np.asarray(params["scale"]), np.asarray(params["bias"]),
        np.asarray(state["mean"]), np.asarray(state["var"]), momentum, eps)
    np.testing.assert_allclose(y, ref_y.reshape(shape), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_state["mean"], ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_state["var"], ref_var, rtol=1e-5, atol=1e-5)

    # eval: the running statistics, and the state comes back unchanged
    y_eval, same = layer.apply(params, new_state, jnp.asarray(x), train=False)
    ref_eval = ((x - np.asarray(new_state["mean"])) / np.sqrt(np.asarray(new_state["var"]) + eps)
                * np.asarray(params["scale"]) + np.asarray(params["bias"]))
    np.testing.assert_allclose(y_eval, ref_eval, rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, same, new_state)


def test_batch_norm_bfloat16_statistics_in_float32():
    layer = batch_norm()
    params, state, _ = nn.abstract_init(layer, (64, 4))
    params = with_random_affine(params)
    state = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), state)
    # a large offset: E[x^2] - E[x]^2 or a bfloat16 reduction would lose it
    x32 = jnp.asarray(rand((64, 4), 2, loc=300.0, scale=1.0)).astype(jnp.bfloat16).astype(jnp.float32)
    y16, s16 = layer.apply(params, state, x32.astype(jnp.bfloat16), train=True)
    y32, s32 = layer.apply(params, state, x32, train=True)
    assert y16.dtype == jnp.bfloat16
    assert s16["mean"].dtype == s16["var"].dtype == jnp.float32
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s16, s32)
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=1e-2, atol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_gradients_match_finite_differences(train):
    layer = batch_norm()
    with jax.enable_x64(True):
        params, _, _ = nn.abstract_init(layer, (4, 2, 3))
        params = {k: jnp.asarray(v, jnp.float64) for k, v in with_random_affine(params).items()}
        state = {"mean": jnp.asarray(rand((3,), 2), jnp.float64),
                 "var": jnp.asarray(rand((3,), 3) ** 2 + 0.5, jnp.float64)}
        x = jnp.asarray(rand((4, 2, 3), 4), jnp.float64)
        f = lambda p, x: layer.apply(p, state, x, train=train)[0]
        check_grads(jax.jit(f), (params, x), order=2 if train else 1, modes=("fwd", "rev"), eps=1e-4, atol=1e-5, rtol=1e-5)


def test_batch_norm_matches_torch():
    torch = pytest.importorskip("torch")
    momentum, eps = 0.9, 1e-5
    x = rand((4, 5, 6, 3), 9, loc=-1.0, scale=2.0)
    layer = batch_norm(momentum=momentum, eps=eps)
    params, state, _ = nn.abstract_init(layer, x.shape)
    params = with_random_affine(params)
    state = {"mean": jnp.asarray(rand((3,), 10)), "var": jnp.asarray(rand((3,), 11) ** 2 + 0.5)}

    mod = torch.nn.BatchNorm2d(3, eps=eps, momentum=1 - momentum)  # PyTorch's momentum is 1 - ours
    with torch.no_grad():
        mod.weight.copy_(torch.from_numpy(np.array(params["scale"])))
        mod.bias.copy_(torch.from_numpy(np.array(params["bias"])))
        mod.running_mean.copy_(torch.from_numpy(np.array(state["mean"])))
        mod.running_var.copy_(torch.from_numpy(np.array(state["var"])))
        xt = torch.from_numpy(x).movedim(-1, 1)
        mod.train()
        yt_train = mod(xt).movedim(1, -1).numpy()
        mod.eval()
        yt_eval = mod(xt).movedim(1, -1).numpy()

    y, new_state = layer.apply(params, state, jnp.asarray(x), train=True)
    np.testing.assert_allclose(y, yt_train, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(new_state["mean"], mod.running_mean.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(new_state["var"], mod.running_var.numpy(), atol=1e-5, rtol=1e-5)
    y_eval, _ = layer.apply(params, new_state, jnp.asarray(x), train=False)
    np.testing.assert_allclose(y_eval, yt_eval, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 3, 2, 4)])  # (devices, per-device batch, ..., C)
def test_batch_norm_axis_name_equals_global_batch(shape):
    layer = batch_norm(momentum=0.8, axis_name="d")
    single = batch_norm(momentum=0.8)
    c = shape[-1]
    params, _, _ = nn.abstract_init(layer, shape[1:])
    params = with_random_affine(params)
    state = {"mean": jnp.asarray(rand((c,), 3)), "var": jnp.asarray(rand((c,), 4) ** 2 + 0.5)}
    shards = jnp.asarray(rand(shape, 5, loc=1.0, scale=2.0))

    y, new_state = jax.vmap(lambda x: layer.apply(params, state, x, train=True), axis_name="d")(shards)
    glob = shards.reshape((-1,) + shape[2:])
    y_ref, state_ref = single.apply(params, state, glob, train=True)
    np.testing.assert_allclose(y.reshape(y_ref.shape), y_ref, rtol=1e-5, atol=1e-5)
    for k in ("mean", "var"):
        assert new_state[k].shape == (shape[0], c)
        for d in range(shape[0]):
            np.testing.assert_allclose(new_state[k][d], state_ref[k], rtol=1e-5, atol=1e-6)

    # without axis_name each shard would use its own statistics: different output
    y_local, _ = jax.vmap(lambda x: single.apply(params, state, x, train=True))(shards)
    assert not np.allclose(y_local.reshape(y_ref.shape), y_ref, atol=1e-3)

    # eval mode needs no collective and ignores the batch
    y_eval, s_eval = jax.vmap(lambda x: layer.apply(params, state, x), axis_name="d")(shards)
    y_eval_ref, _ = single.apply(params, state, glob)
    np.testing.assert_allclose(y_eval.reshape(y_eval_ref.shape), y_eval_ref, rtol=1e-6, atol=1e-6)


PMAP_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from fundl.nn.norm import batch_norm
n = jax.local_device_count()
assert n == 2, n
layer, single = batch_norm(momentum=0.8, axis_name="d"), batch_norm(momentum=0.8)
params, state, _ = single.init(jax.random.key(0), (4, 3))
shards = jnp.asarray(np.random.default_rng(1).normal(2.0, 3.0, (n, 4, 3)), jnp.float32)
step = jax.pmap(lambda x: layer.apply(params, state, x, train=True), axis_name="d")
y, new_state = step(shards)
y_ref, state_ref = single.apply(params, state, shards.reshape(-1, 3), train=True)
np.testing.assert_allclose(np.asarray(y).reshape(-1, 3), y_ref, rtol=1e-5, atol=1e-5)
for k in ("mean", "var"):
    for d in range(n):
        np.testing.assert_allclose(new_state[k][d], state_ref[k], rtol=1e-5, atol=1e-6)
print("ok")
"""


@pytest.mark.slow
def test_batch_norm_pmap_on_two_devices_equals_global_batch():
    """The real pmap path, on two fake CPU devices (a fresh process: the device
    count is fixed when JAX starts)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", PMAP_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.slow
def test_batch_norm_in_a_model_threads_state():
    model = nn.serial(nn.dense(4), batch_norm(), nn.relu, nn.dense(2), batch_norm())
    params, state, _ = model.init(KEY, (8, 3))
    assert set(state) == {"batch_norm_0", "batch_norm_1"}
    x = jnp.asarray(rand((8, 3), 2))
    step = jax.jit(lambda p, s, x: model.apply(p, s, x, train=True))
    _, s1 = step(params, state, x)
    assert not np.allclose(s1["batch_norm_0"]["mean"], 0)
    _, s_eval = model.apply(params, s1, x, train=False)
    jax.tree.map(np.testing.assert_array_equal, s_eval, s1)


# --------------------------------------------------------------------------
# Group norm.


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


GN_CASES = [  # (num_groups, input shape, kwargs)
    (2, (3, 6), {}),
    (3, (2, 7, 6), {}),
    (1, (2, 5, 4), {}),
    (4, (2, 5, 5, 4), {}),  # instance norm
    (2, (2, 4, 4, 6), {"use_scale": False}),
    (2, (2, 9, 4), {"use_bias": False, "eps": 1e-3}),
]


@pytest.mark.slow
@pytest.mark.parametrize("groups,shape,kw", GN_CASES, ids=[f"g{g}_{'x'.join(map(str, s))}" for g, s, _ in GN_CASES])
def test_group_norm_contract_and_numpy_reference(groups, shape, kw):
    layer = nn.group_norm(groups, **kw)
    check_layer(layer, shape)
    params, state, out = layer.init(KEY, shape)
    assert state == {} and out == shape
    assert all(v.shape == (shape[-1],) for v in params.values())
    params = with_random_affine(params)
    x = rand(shape, 4, loc=2.0, scale=3.0)
    y, new_state = layer.apply(params, state, jnp.asarray(x), train=True)
    assert new_state == {}
    ref = np_group_norm(x, groups, params.get("scale"), params.get("bias"), kw.get("eps", 1e-5))
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_group_norm_matches_torch():
    torch = pytest.importorskip("torch")
    for groups, shape in ((2, (2, 6)), (3, (2, 7, 6)), (2, (2, 5, 4, 6))):
        layer = nn.group_norm(groups)
        params = with_random_affine(layer.init(KEY, shape)[0])
        x = rand(shape, 9, loc=1.0, scale=2.0)
        y, _ = layer.apply(params, {}, jnp.asarray(x))
        mod = torch.nn.GroupNorm(groups, shape[-1], eps=1e-5)
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(np.array(params["scale"])))
            mod.bias.copy_(torch.from_numpy(np.array(params["bias"])))
            xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy())  # PyTorch is channels-first
            yt = np.moveaxis(mod(xt).numpy(), 1, -1)
        np.testing.assert_allclose(y, yt, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_group_norm_gradients_match_finite_differences():
    layer = nn.group_norm(2)
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v, jnp.float64) for k, v in with_random_affine(layer.init(KEY, (2, 3, 4))[0]).items()}
        x = jnp.asarray(rand((2, 3, 4), 5), jnp.float64)
        f = lambda p, x: layer.apply(p, {}, x)[0]
        check_grads(jax.jit(f), (params, x), order=2, modes=("fwd", "rev"), eps=1e-4, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_group_norm_examples_do_not_interact():
    """Each example's output is that of a batch of one: what per-example gradients need."""
    layer = nn.group_norm(2)
    params = with_random_affine(layer.init(KEY, (5, 6, 4))[0])
    x = jnp.asarray(rand((5, 6, 4), 2))
    y, _ = layer.apply(params, {}, x, train=True)
    for i in range(5):
        yi, _ = layer.apply(params, {}, x[i:i + 1], train=True)
        np.testing.assert_allclose(y[i:i + 1], yi, rtol=1e-6, atol=1e-6)


def test_group_norm_bfloat16_input_computes_statistics_in_float32():
    layer = nn.group_norm(2)
    params, state, _ = layer.init(KEY, (2, 64))
    x32 = jnp.asarray(rand((2, 64), 3, loc=100.0, scale=0.5)).astype(jnp.bfloat16).astype(jnp.float32)
    y16, _ = layer.apply(params, state, x32.astype(jnp.bfloat16))
    y32, _ = layer.apply(params, state, x32)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=1e-2, atol=1e-2)


def test_group_norm_errors_name_the_problem():
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


# --------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("layer,shape,bad,expected", [
    (batch_norm(), (4, 3), (4, 5), "(batch, ..., 3)"),
    (batch_norm(), (2, 4, 4, 3), (2, 4, 4, 2), "(batch, ..., 3)"),
    (layer_norm(), (2, 6), (2, 5), "(..., 6)"),
    (layer_norm(axis=(-2, -1)), (2, 3, 4), (2, 4, 3), "(..., 3, 4)"),
])
def test_wrong_channel_count_is_a_shape_error(layer, shape, bad, expected):
    params, state, _ = nn.abstract_init(layer, shape)
    with pytest.raises(nn.ShapeError) as err:
        layer.apply(params, state, jnp.ones(bad), train=True)
    msg = str(err.value)
    assert expected in msg and str(bad) in msg, msg


@pytest.mark.parametrize("layer,shape,bad", [
    (batch_norm(), (4, 3), (3,)),
    (layer_norm(axis=(-2, -1)), (2, 3, 4), (4,)),
    (layer_norm(axis=(1, 2)), (2, 3, 4), (2, 3)),
])
def test_wrong_rank_is_a_shape_error(layer, shape, bad):
    params, state, _ = nn.abstract_init(layer, shape)
    with pytest.raises(nn.ShapeError) as err:
        layer.apply(params, state, jnp.ones(bad))
    msg = str(err.value)
    got = "(" + ", ".join(map(str, bad)) + ")"  # fundl writes (3) for a 1-tuple
    assert got in msg and f"rank {len(bad)}" in msg, msg


def test_init_errors():
    with pytest.raises(nn.ShapeError, match="batch axis"):
        layer_norm(axis=0).init(KEY, (4, 3))
    with pytest.raises(nn.ShapeError, match="rank >= 2"):
        batch_norm().init(KEY, (3,))
    with pytest.raises(ValueError, match="momentum"):
        batch_norm(momentum=1.5)


def test_unbound_axis_name_explains_what_to_do():
    layer = batch_norm(axis_name="d")
    params, state, _ = nn.abstract_init(layer, (4, 3))
    with pytest.raises(nn.LayerError, match=r"axis_name='d'.*jax.pmap"):
        layer.apply(params, state, jnp.ones((4, 3)), train=True)
    params, state = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), (params, state))
    layer.apply(params, state, jnp.ones((4, 3)))  # eval needs no collective: fine


def test_missing_state_is_a_params_error():
    layer = batch_norm()
    params, _, _ = nn.abstract_init(layer, (4, 3))
    with pytest.raises(nn.ParamsError, match="missing state entry 'mean'"):
        layer.apply(params, {}, jnp.ones((4, 3)), train=True)
