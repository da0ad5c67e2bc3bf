"""Convolution and pooling layers: contract, NumPy loop references, gradients,
PyTorch numerics and error messages."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from fundl import nn
from fundl.nn import flat_random
from fundl.nn.conv import (
    avg_pool1d, avg_pool2d, conv1d, conv2d, global_avg_pool, global_max_pool,
    max_pool1d, max_pool2d,
)
from layer_checks import check_layer

KEY = jax.random.key(0)


def cheap_init(key, shape, dtype=jnp.float32):
    """A deterministic initialiser: on CPU every new shape given to jax.random
    costs a threefry compilation (seconds on a busy machine), and the contract
    checks do not depend on the initial values.  The default LeCun init is
    tested once on its own."""
    n = math.prod(shape)
    return (jnp.sin(jnp.arange(n, dtype=jnp.float32) * 0.7) * 0.3).reshape(shape).astype(dtype)


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------
# Independent NumPy references: explicit loops over output positions.


def same_pads(n, k, s, d=1):
    """TensorFlow/JAX 'SAME': out = ceil(n / s), the smaller half of the padding first."""
    out = -(-n // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
    return (total // 2, total - total // 2)


def resolve_pads(padding, sizes, kernel, stride, dilation):
    if padding == "SAME":
        return [same_pads(n, k, s, d) for n, k, s, d in zip(sizes, kernel, stride, dilation)]
    if padding == "VALID":
        return [(0, 0)] * len(sizes)
    if isinstance(padding, int):
        return [(padding, padding)] * len(sizes)
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def np_conv(x, w, b, stride, padding, dilation, groups):
    nd = x.ndim - 2
    kernel = w.shape[:nd]
    pads = resolve_pads(padding, x.shape[1:-1], kernel, stride, dilation)
    xp = np.pad(x.astype(np.float64), [(0, 0)] + list(pads) + [(0, 0)])
    cin_g, feats = w.shape[nd], w.shape[-1]
    f_g = feats // groups
    out = [(xp.shape[1 + i] - (kernel[i] - 1) * dilation[i] - 1) // stride[i] + 1 for i in range(nd)]
    y = np.zeros((x.shape[0], *out, feats))
    for pos in np.ndindex(*out):
        for kpos in np.ndindex(*kernel):
            idx = tuple(p * s + q * d for p, q, s, d in zip(pos, kpos, stride, dilation))
            patch = xp[(slice(None),) + idx]  # (N, C_in)
            for g in range(groups):
                y[(slice(None),) + pos + (slice(g * f_g, (g + 1) * f_g),)] += (
                    patch[:, g * cin_g:(g + 1) * cin_g] @ w[kpos][:, g * f_g:(g + 1) * f_g]
                )
    return y + (0 if b is None else b)


def np_pool(x, kind, window, stride, padding):
    """Max/mean over the *real* elements of each window (padding never counts)."""
    nd = x.ndim - 2
    sizes = x.shape[1:-1]
    pads = resolve_pads(padding, sizes, window, stride, (1,) * nd)
    out = [(n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(sizes, pads, window, stride)]
    y = np.zeros((x.shape[0], *out, x.shape[-1]))
    for pos in np.ndindex(*out):
        vals = []
        for kpos in np.ndindex(*window):
            idx = tuple(p * s + q - lo for p, q, s, (lo, _) in zip(pos, kpos, stride, pads))
            if all(0 <= i < n for i, n in zip(idx, sizes)):
                vals.append(x[(slice(None),) + idx])
        vals = np.stack(vals)
        y[(slice(None),) + pos] = vals.max(0) if kind == "max" else vals.mean(0)
    return y


# --------------------------------------------------------------------------
# One table of configurations: the generic contract and the NumPy reference.

# Most cases share two input shapes: check_layer draws its inputs with
# jax.random, which compiles once per shape.
S1, S2 = (2, 9, 6), (2, 7, 6, 4)

CONV_CASES = [
    # (id, constructor, kwargs, input shape)
    ("1d_same", conv1d, dict(features=5, kernel_size=3), S1),
    ("1d_same_even", conv1d, dict(features=4, kernel_size=4), (3, 10, 2)),
    ("1d_valid_stride2", conv1d, dict(features=4, kernel_size=4, stride=2, padding="VALID"), (3, 11, 2)),
    ("1d_explicit_dilated", conv1d, dict(features=4, kernel_size=3, padding=[(1, 3)], dilation=2), S1),
    ("1d_int_pad_groups", conv1d, dict(features=6, kernel_size=3, padding=1, feature_group_count=3), S1),
    ("1d_same_stride_dilation", conv1d, dict(features=3, kernel_size=3, stride=2, dilation=2), S1),
    ("1d_nobias", conv1d, dict(features=3, kernel_size=1, use_bias=False), S1),
    ("2d_same", conv2d, dict(features=4, kernel_size=3), (2, 6, 5, 3)),
    ("2d_same_stride2", conv2d, dict(features=4, kernel_size=3, stride=2), S2),
    ("2d_valid_rect", conv2d, dict(features=3, kernel_size=(2, 3), stride=(1, 2), padding="VALID"), S2),
    ("2d_explicit", conv2d, dict(features=3, kernel_size=3, padding=[(0, 1), (2, 1)]), (1, 5, 6, 2)),
    ("2d_dilation", conv2d, dict(features=2, kernel_size=3, dilation=(2, 1), padding="VALID"), S2),
    ("2d_groups", conv2d, dict(features=4, kernel_size=3, padding=1, feature_group_count=2), S2),
    ("2d_depthwise", conv2d, dict(features=8, kernel_size=3, stride=2, feature_group_count=4), S2),
]


def as_tuple(v, nd):
    return (v,) * nd if isinstance(v, int) else tuple(v)


# check_layer compiles several programs per layer, so it runs on a subset
# that still covers 1D/2D, strides, SAME/VALID/int/explicit padding, dilation,
# groups and no bias; the NumPy reference runs on every case.
CONTRACT = {"1d_explicit_dilated", "1d_int_pad_groups", "1d_nobias",
            "2d_same_stride2", "2d_valid_rect", "2d_depthwise"}


@pytest.mark.parametrize("cid,make,kw,shape", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_contract_and_numpy_reference(cid, make, kw, shape):
    layer = make(**kw)
    nd = len(shape) - 2
    k = as_tuple(kw["kernel_size"], nd)
    groups = kw.get("feature_group_count", 1)
    w_shape = k + (shape[-1] // groups, kw["features"])
    if cid in CONTRACT:
        params, _, _ = check_layer(make(**kw, w_init=cheap_init), shape)
        assert jax.tree.map(jnp.shape, params) == (
            {"w": w_shape, "b": (kw["features"],)} if kw.get("use_bias", True) else {"w": w_shape})

    x = rand(shape, 1)
    w = rand(w_shape, 2)
    b = rand((kw["features"],), 3) if kw.get("use_bias", True) else None
    params = {"w": jnp.asarray(w)} if b is None else {"w": jnp.asarray(w), "b": jnp.asarray(b)}
    y, state = layer.apply(params, {}, jnp.asarray(x))
    assert state == {}
    ref = np_conv(x, w.astype(np.float64), b,
                  as_tuple(kw.get("stride", 1), nd), kw.get("padding", "SAME"),
                  as_tuple(kw.get("dilation", 1), nd), groups)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_conv_default_init_is_lecun_normal_and_zero_bias():
    params, _, _ = conv2d(64, 3, feature_group_count=2).init(KEY, (1, 8, 8, 32))
    fan_in = 3 * 3 * 16
    assert params["w"].shape == (3, 3, 16, 64)
    np.testing.assert_allclose(np.std(params["w"]), 1 / math.sqrt(fan_in), rtol=0.05)
    np.testing.assert_array_equal(params["b"], 0)


def test_conv_custom_initialisers_and_dtype():
    layer = conv1d(3, 2, w_init=nn.init.ones, b_init=nn.init.constant(0.5), dtype=jnp.bfloat16)
    params, _, _ = layer.init(KEY, (1, 4, 2))
    assert params["w"].dtype == jnp.bfloat16
    y, _ = layer.apply(params, {}, jnp.ones((1, 4, 2), jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    # SAME, kernel 2: pads (0, 1), so the last position sees one real element
    np.testing.assert_allclose(np.asarray(y[0, :, 0], np.float32), [4.5, 4.5, 4.5, 2.5])


POOL_CASES = [
    ("max1d", max_pool1d, dict(window=2), S1),
    ("max1d_same_stride1", max_pool1d, dict(window=3, stride=1, padding="SAME"), S1),
    ("max1d_explicit", max_pool1d, dict(window=3, stride=2, padding=[(1, 1)]), S1),
    ("avg1d", avg_pool1d, dict(window=3), (2, 10, 3)),
    ("avg1d_same", avg_pool1d, dict(window=2, padding="SAME"), S1),
    ("max2d", max_pool2d, dict(window=2), S2),
    ("max2d_same", max_pool2d, dict(window=(2, 3), stride=(1, 2), padding="SAME"), S2),
    ("avg2d_valid_stride", avg_pool2d, dict(window=3, stride=2), S2),
    ("avg2d_same", avg_pool2d, dict(window=3, stride=2, padding="SAME"), (2, 6, 7, 2)),
    ("avg2d_explicit", avg_pool2d, dict(window=3, stride=1, padding=1), (1, 4, 5, 3)),
]


POOL_CONTRACT = {"max1d_explicit", "avg1d_same", "max2d_same", "avg2d_valid_stride"}


@pytest.mark.slow
@pytest.mark.parametrize("cid,make,kw,shape", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_pool_contract_and_numpy_reference(cid, make, kw, shape):
    layer = make(**kw)
    if cid in POOL_CONTRACT:
        params, state, _ = check_layer(layer, shape)
        assert params == {} and state == {}
    assert layer.init(KEY, shape)[0:2] == ({}, {})
    nd = len(shape) - 2
    window = as_tuple(kw["window"], nd)
    stride = as_tuple(kw.get("stride") or kw["window"], nd)
    x = rand(shape, 3)
    y, _ = layer.apply({}, {}, jnp.asarray(x))
    kind = "max" if "max" in cid else "avg"
    ref = np_pool(x, kind, window, stride, kw.get("padding", "VALID"))
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


def test_avg_pool_same_padding_divides_by_valid_count():
    # width 3, window 2, SAME: pads (0, 1); the last window holds one real element.
    y, _ = avg_pool1d(2, padding="SAME").apply({}, {}, jnp.array([[[2.0], [4.0], [6.0]]]))
    np.testing.assert_allclose(y[0, :, 0], [3.0, 6.0])


def test_max_pool_integer_input():
    x = jnp.arange(-12, 0, dtype=jnp.int32).reshape(1, 12, 1)
    y, _ = max_pool1d(3, stride=3, padding="SAME").apply({}, {}, x)
    np.testing.assert_array_equal(y[0, :, 0], [-10, -7, -4, -1])


@pytest.mark.parametrize("make", [global_avg_pool, global_max_pool])
@pytest.mark.parametrize("shape", [S1, S2])
def test_global_pools(make, shape):
    layer = make()
    _, _, out = layer.init(KEY, shape)
    assert out == (shape[0], shape[-1])
    if (make is global_avg_pool) == (len(shape) == 4):
        check_layer(layer, shape)
    x = rand(shape, 4)
    y, _ = layer.apply({}, {}, jnp.asarray(x))
    axes = tuple(range(1, len(shape) - 1))
    ref = x.mean(axes) if make is global_avg_pool else x.max(axes)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    keep = make(keepdims=True)
    assert keep.init(KEY, shape)[2] == (shape[0],) + (1,) * len(axes) + (shape[-1],)
    y_keep, _ = keep.apply({}, {}, jnp.asarray(x))
    np.testing.assert_allclose(y_keep.reshape(y.shape), y)


@pytest.mark.slow
def test_small_cnn_composes_with_serial():
    model = nn.serial(
        conv2d(4, 3, w_init=cheap_init), nn.relu, max_pool2d(2),
        conv2d(8, 3, stride=2, padding="VALID", w_init=cheap_init),
        nn.relu, global_avg_pool(), nn.dense(3, w_init=cheap_init),
    )
    params, state, out = model.init(KEY, (2, 8, 8, 1))
    assert set(params) == {"conv2d_0", "conv2d_1", "dense_0"} and state == {}
    assert out == (2, 3)
    y, _ = jax.jit(lambda p, x: model.apply(p, state, x))(params, jnp.ones((5, 8, 8, 1)))
    assert y.shape == (5, 3)


# --------------------------------------------------------------------------
# Gradients by finite differences (float64).


@pytest.mark.slow
@pytest.mark.parametrize("layer,shape", [
    (conv1d(3, 3, stride=2, padding=[(1, 2)], dilation=1, feature_group_count=1), (2, 7, 2)),
    (conv2d(4, (2, 3), stride=(2, 1), dilation=(1, 2), feature_group_count=2), (1, 5, 6, 2)),
    (max_pool2d(2, stride=1, padding="SAME"), (1, 4, 4, 2)),
    (avg_pool1d(3, stride=2, padding="SAME"), (2, 7, 2)),
    (avg_pool2d(2), (1, 4, 4, 2)),
    (global_avg_pool(), (2, 3, 3, 2)),
], ids=["conv1d", "conv2d", "max_pool2d", "avg_pool1d", "avg_pool2d", "global_avg_pool"])
def test_gradients_match_finite_differences(layer, shape, request):
    with jax.enable_x64(True):
        params, _, _ = nn.abstract_init(layer, shape)
        params = {k: jnp.asarray(rand(v.shape, 11 + i), jnp.float64)
                  for i, (k, v) in enumerate(sorted(params.items()))}
        # distinct values so max pooling has a unique, stable winner
        x = jnp.asarray(np.random.default_rng(5).permutation(math.prod(shape)).reshape(shape) / 7.0)
        f = lambda p, x: layer.apply(p, {}, x)[0]
        # jit matters: it once caught pooling that was not differentiable under jit
        order = 2 if request.node.callspec.id == "conv2d" else 1
        check_grads(jax.jit(f), (params, x), order=order, modes=("fwd", "rev"), eps=1e-4, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------
# PyTorch numerics, given the same weights.

TORCH_CONV = [
    # (nd, in_channels, out, kernel, stride, padding (ours), dilation, groups, spatial)
    (1, 4, 6, 3, 1, 1, 1, 1, (10,)),
    (1, 4, 6, 3, 2, 0, 2, 2, (11,)),
    (1, 3, 3, 5, 1, "SAME", 1, 3, (9,)),
    (1, 2, 4, 3, 2, [(2, 1)], 1, 1, (8,)),
    (2, 3, 5, 3, 1, 1, 1, 1, (7, 6)),
    (2, 4, 6, (3, 2), (2, 1), (1, 0), (1, 2), 2, (9, 8)),
    (2, 4, 4, 3, 2, [(0, 1), (1, 2)], 1, 4, (6, 7)),
    (2, 2, 3, 3, 1, "VALID", 2, 1, (8, 8)),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", TORCH_CONV)
def test_conv_matches_torch(case):
    torch = pytest.importorskip("torch")
    nd, cin, cout, k, s, pad, d, g, spatial = case
    make = conv1d if nd == 1 else conv2d
    layer = make(cout, k, stride=s, padding=pad, dilation=d, feature_group_count=g)
    x = rand((2,) + spatial + (cin,), 6)
    ks = as_tuple(k, nd)
    params = {"w": jnp.asarray(rand(ks + (cin // g, cout), 9)), "b": jnp.asarray(rand((cout,), 7))}
    y, _ = layer.apply(params, {}, jnp.asarray(x))

    Conv = torch.nn.Conv1d if nd == 1 else torch.nn.Conv2d
    ss, ds = as_tuple(s, nd), as_tuple(d, nd)
    pads = resolve_pads(pad, spatial, ks, ss, ds)
    mod = Conv(cin, cout, ks, stride=ss, padding=0, dilation=ds, groups=g)
    perm = (nd + 1, nd) + tuple(range(nd))  # (*k, in/g, out) -> (out, in/g, *k)
    with torch.no_grad():
        mod.weight.copy_(torch.from_numpy(np.asarray(params["w"]).transpose(perm).copy()))
        mod.bias.copy_(torch.from_numpy(np.array(params["b"])))
        xt = torch.from_numpy(x).movedim(-1, 1)
        flat = [p for lo_hi in reversed(pads) for p in lo_hi]  # F.pad: last axis first
        yt = mod(torch.nn.functional.pad(xt, flat)).movedim(1, -1).numpy()
    np.testing.assert_allclose(y, yt, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("nd", [1, 2])
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("window,stride,pad", [(2, None, 0), (3, 2, 1), (3, 1, 1)])
def test_pool_matches_torch(nd, kind, window, stride, pad):
    torch = pytest.importorskip("torch")
    make = {("max", 1): max_pool1d, ("max", 2): max_pool2d,
            ("avg", 1): avg_pool1d, ("avg", 2): avg_pool2d}[kind, nd]
    spatial = (9,) if nd == 1 else (7, 8)
    x = rand((2,) + spatial + (3,), 8)
    y, _ = make(window, stride, padding=pad).apply({}, {}, jnp.asarray(x))
    if kind == "max":
        Pool = torch.nn.MaxPool1d if nd == 1 else torch.nn.MaxPool2d
        mod = Pool(window, stride, padding=pad)
    else:
        Pool = torch.nn.AvgPool1d if nd == 1 else torch.nn.AvgPool2d
        mod = Pool(window, stride, padding=pad, count_include_pad=False)
    yt = mod(torch.from_numpy(x).movedim(-1, 1)).movedim(1, -1).numpy()
    np.testing.assert_allclose(y, yt, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("make,shape,bad", [
    (lambda: conv1d(4, 3), (2, 8, 3), (2, 8, 5)),
    (lambda: conv2d(4, 3), (2, 6, 6, 3), (2, 6, 6, 1)),
    (lambda: conv2d(4, 3, feature_group_count=2), (2, 6, 6, 4), (2, 6, 6, 2)),
])
def test_wrong_channel_count_is_a_shape_error(make, shape, bad):
    layer = make()
    params, state, _ = nn.abstract_init(layer, shape)  # errors fire before any FLOP
    with pytest.raises(nn.ShapeError) as err:
        layer.apply(params, state, jnp.ones(bad))
    msg = str(err.value)
    expected = "(" + ", ".join(["*"] * (len(shape) - 1) + [str(shape[-1])]) + ")"
    assert expected in msg and str(bad) in msg, msg


@pytest.mark.parametrize("make,shape,bad", [
    (lambda: conv1d(4, 3), (2, 8, 3), (8, 3)),
    (lambda: conv2d(4, 3), (2, 6, 6, 3), (6, 6, 3)),
    (lambda: conv2d(4, 3), (2, 6, 6, 3), (1, 2, 6, 6, 3)),
    (lambda: max_pool2d(2), (2, 6, 6, 3), (6, 6, 3)),
    (lambda: avg_pool1d(2), (2, 6, 3), (2, 6, 3, 1)),
    (lambda: global_avg_pool(), (2, 6, 3), (2, 3)),
])
def test_wrong_rank_is_a_shape_error(make, shape, bad):
    layer = make()
    params, state, _ = nn.abstract_init(layer, shape)  # errors fire before any FLOP
    with pytest.raises(nn.ShapeError) as err:
        layer.apply(params, state, jnp.ones(bad))
    msg = str(err.value)
    assert str(bad) in msg and f"rank {len(bad)}" in msg, msg


def test_shape_error_under_jit_and_inside_serial_names_the_layer():
    model = nn.serial(conv2d(4, 3, w_init=cheap_init), nn.relu, conv2d(2, 3, w_init=cheap_init))
    params, state, _ = model.init(KEY, (1, 5, 5, 3))
    with pytest.raises(nn.ShapeError, match=r"conv2d_0.*\(\*, \*, \*, 3\).*\(1, 5, 5, 2\)"):
        jax.jit(lambda p, x: model.apply(p, state, x))(params, jnp.ones((1, 5, 5, 2)))


def test_init_errors():
    with pytest.raises(nn.ShapeError, match="does not fit"):
        conv2d(2, 5, padding="VALID").init(KEY, (1, 3, 3, 1))
    with pytest.raises(nn.ShapeError, match="rank 4"):
        conv2d(2, 3).init(KEY, (3, 3, 1))
    with pytest.raises(nn.ShapeError, match="not divisible"):
        conv2d(4, 3, feature_group_count=2).init(KEY, (1, 5, 5, 3))
    with pytest.raises(ValueError, match="feature_group_count"):
        conv1d(3, 3, feature_group_count=2)
    with pytest.raises(ValueError, match=r"\[\(1, 2\)\]"):
        conv1d(3, 3, padding=(1, 2))
    with pytest.raises(ValueError, match="kernel_size"):
        conv2d(3, (3, 3, 3))
    with pytest.raises(ValueError, match="padding"):
        max_pool2d(2, padding="FULL")


def _reduce_window_max(x, window):
    dims = (1,) + window + (1,)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, dims, "VALID")


@pytest.mark.slow
@pytest.mark.parametrize("make, shape, window", [
    (max_pool2d, (3, 6, 8, 4), (2, 2)),
    (max_pool2d, (2, 6, 6, 3), (3, 2)),
    (max_pool1d, (3, 12, 5), (4,)),
])
def test_tiling_max_pool_equals_reduce_window_values_gradient_and_ties(make, shape, window):
    """Windows that tile the input run as a reshape and a max (fast on XLA:CPU); values,
    gradients and forward-mode tangents equal ``reduce_window``'s, and a tie sends the whole
    gradient to the first maximum in row-major window order (as PyTorch does), not split."""
    layer = make(window if len(window) > 1 else window[0])
    x = flat_random.normal(jax.random.key(0), shape)
    x = x.at[0, 0, 0].set(9.0).at[0, 1, 0].set(9.0)  # a tie inside one window
    x = x.at[1].set(0.0)                              # whole windows of ties (relu zeros)
    pool = lambda a: layer.apply({}, {}, a)[0]
    np.testing.assert_array_equal(pool(x), _reduce_window_max(x, window))
    r = flat_random.normal(jax.random.key(1), pool(x).shape)
    grad = lambda f: jax.grad(lambda a: jnp.vdot(f(a), r))(x)
    np.testing.assert_array_equal(grad(pool), grad(lambda a: _reduce_window_max(a, window)))
    t = flat_random.normal(jax.random.key(2), shape)
    np.testing.assert_array_equal(jax.jvp(pool, (x,), (t,))[1],
                                  jax.jvp(lambda a: _reduce_window_max(a, window), (x,), (t,))[1])


def test_tiling_max_pool_lowers_without_reduce_window():
    x = jnp.zeros((4, 8, 8, 2))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda a: max_pool2d(2).apply({}, {}, a)[0].sum()))(x))
    assert "reduce_window" not in jaxpr and "select_and_scatter" not in jaxpr
    # overlapping windows keep reduce_window
    jaxpr = str(jax.make_jaxpr(lambda a: max_pool2d(3, stride=2).apply({}, {}, a)[0])(x))
    assert "reduce_window_max" in jaxpr
