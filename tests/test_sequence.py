"""Sequence layers (fundl.nn.sequence): scanned LSTM/GRU against NumPy and Python loops; lengths,
reverse, bidirectional, stacked; errors.  PyTorch numerics: test_interop_torch.py; cells: test_cells.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from fundl import nn
from fundl.interop import gru_params_from_torch, lstm_params_from_torch
from layer_checks import check_layer

KEY = jax.random.key(0)
B, T, F, H = 3, 5, 4, 6


def rand(seed, *shape, scale=1.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


# --------------------------------------------------------------------------
# Independent references, with torch's weight layout: W_ih (G*H, F),
# W_hh (G*H, H), b_ih, b_hh (G*H,).


def torch_like_weights(seed, gates, f=F, h=H):
    k = 1 / math.sqrt(h)
    r = np.random.default_rng(seed)
    u = lambda *s: r.uniform(-k, k, size=s).astype(np.float32)
    return {"weight_ih_l0": u(gates * h, f), "weight_hh_l0": u(gates * h, h),
            "bias_ih_l0": u(gates * h), "bias_hh_l0": u(gates * h)}


def sig(z):
    return 1 / (1 + np.exp(-z))


def np_lstm(sd, x, h=None, c=None):
    """x: (T, F) one sequence; returns (ys (T, H), (h, c)), float64."""
    W_ih, W_hh = sd["weight_ih_l0"].astype(np.float64), sd["weight_hh_l0"].astype(np.float64)
    b = sd["bias_ih_l0"].astype(np.float64) + sd["bias_hh_l0"].astype(np.float64)
    n = W_hh.shape[1]
    h = np.zeros(n) if h is None else h
    c = np.zeros(n) if c is None else c
    ys = []
    for x_t in x.astype(np.float64):
        z = W_ih @ x_t + W_hh @ h + b
        i, f, g, o = z[:n], z[n:2 * n], z[2 * n:3 * n], z[3 * n:]
        c = sig(f) * c + sig(i) * np.tanh(g)
        h = sig(o) * np.tanh(c)
        ys.append(h)
    return np.array(ys).reshape(len(x), n), (h, c)


def np_gru(sd, x, h=None):
    W_ih, W_hh = sd["weight_ih_l0"].astype(np.float64), sd["weight_hh_l0"].astype(np.float64)
    b_ih, b_hh = sd["bias_ih_l0"].astype(np.float64), sd["bias_hh_l0"].astype(np.float64)
    n = W_hh.shape[1]
    h = np.zeros(n) if h is None else h
    ys = []
    for x_t in x.astype(np.float64):
        gi, gh = W_ih @ x_t + b_ih, W_hh @ h + b_hh
        r = sig(gi[:n] + gh[:n])
        z = sig(gi[n:2 * n] + gh[n:2 * n])
        m = np.tanh(gi[2 * n:] + r * gh[2 * n:])
        h = (1 - z) * m + z * h
        ys.append(h)
    return np.array(ys).reshape(len(x), n), h


def jax_loop_lstm(p, x):
    """A plain Python loop over time (no scan), batch-major x (B, T, F)."""
    n = p["w"].shape[1] // 4
    h = c = jnp.zeros((x.shape[0], n))
    ys = []
    for t in range(x.shape[1]):
        z = x[:, t] @ p["w"][:-n] + h @ p["w"][-n:] + p["b"]
        i, f, g, o = (z[:, k * n:(k + 1) * n] for k in range(4))
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        ys.append(h)
    return jnp.stack(ys, 1), (h, c)


def jax_loop_gru(p, x):
    n = p["w_hh"].shape[0]
    h = jnp.zeros((x.shape[0], n))
    ys = []
    for t in range(x.shape[1]):
        gi, gh = x[:, t] @ p["w_ih"] + p["b_ih"], h @ p["w_hh"] + p["b_hh"]
        r = jax.nn.sigmoid(gi[:, :n] + gh[:, :n])
        z = jax.nn.sigmoid(gi[:, n:2 * n] + gh[:, n:2 * n])
        m = jnp.tanh(gi[:, 2 * n:] + r * gh[:, 2 * n:])
        h = (1 - z) * m + z * h
        ys.append(h)
    return jnp.stack(ys, 1), h


# --------------------------------------------------------------------------
# The generic layer contract


LAYERS = {
    "lstm": lambda: nn.lstm(H),
    "gru": lambda: nn.gru(H),
    "lstm_time_major": lambda: nn.lstm(H, time_major=True),
    "gru_reverse_last_output": lambda: nn.gru(H, reverse=True, return_sequences=False),
    "lstm_return_carry": lambda: nn.lstm(H, return_carry=True),
    "bidirectional_lstm_carry": lambda: nn.lstm(H, bidirectional=True, return_carry=True),
    "stacked_generic": lambda: nn.stacked(nn.bidirectional(nn.gru(H), nn.lstm(H), merge="add"),
                                         nn.lstm(3, return_sequences=False)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_contract(name):
    check_layer(LAYERS[name](), (B, T, F))


@pytest.mark.slow
def test_stacked_dropout_contract_in_training():
    check_layer(nn.gru(H, num_layers=2, return_carry=True, dropout=0.3), (B, T, F), train=True)


def test_output_shapes_and_param_names():
    p, s, out = nn.lstm(H, return_carry=True).init(KEY, (B, T, F))
    assert s == {} and set(p) == {"w", "b"}
    assert p["w"].shape == (F + H, 4 * H) and p["b"].shape == (4 * H,)
    assert out == ((B, T, H), ((B, H), (B, H)))
    p, _, out = nn.gru(H, time_major=True, return_carry=True).init(KEY, (T, B, F))
    assert set(p) == {"w_ih", "w_hh", "b_ih", "b_hh"}
    assert out == ((T, B, H), (B, H))
    _, _, out = nn.lstm(H, num_layers=2, bidirectional=True, return_sequences=False).init(KEY, (B, T, F))
    assert out == (B, 2 * H)


# --------------------------------------------------------------------------
# Values against NumPy, gradients against a Python loop


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("time_major", [False, True])
def test_scan_equals_numpy_loop(kind, time_major):
    sd = torch_like_weights(1, 4 if kind == "lstm" else 3)
    x = rand(2, B, T, F)
    params = (lstm_params_from_torch if kind == "lstm" else gru_params_from_torch)(sd)
    layer = (nn.lstm if kind == "lstm" else nn.gru)(H, time_major=time_major, return_carry=True)
    xin = np.swapaxes(x, 0, 1) if time_major else x
    ys, carry = layer.apply(params, {}, jnp.asarray(xin))[0]
    if time_major:
        ys = jnp.swapaxes(ys, 0, 1)
    for b in range(B):
        ref_ys, ref_carry = (np_lstm if kind == "lstm" else np_gru)(sd, x[b])
        np.testing.assert_allclose(ys[b], ref_ys, atol=1e-5)
        got = (carry[0][b], carry[1][b]) if kind == "lstm" else carry[b]
        jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, atol=1e-5), got, ref_carry)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_reverse_equals_numpy_on_flipped_input(kind):
    sd = torch_like_weights(3, 4 if kind == "lstm" else 3)
    x = rand(4, B, T, F)
    params = (lstm_params_from_torch if kind == "lstm" else gru_params_from_torch)(sd)
    ys, _ = (nn.lstm if kind == "lstm" else nn.gru)(H, reverse=True).apply(params, {}, jnp.asarray(x))
    for b in range(B):
        ref, _ = (np_lstm if kind == "lstm" else np_gru)(sd, x[b, ::-1])
        np.testing.assert_allclose(ys[b], ref[::-1], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gradients_equal_python_loop(kind):
    layer = (nn.lstm if kind == "lstm" else nn.gru)(H, return_carry=True)
    loop = jax_loop_lstm if kind == "lstm" else jax_loop_gru
    params, _, _ = layer.init(KEY, (B, T, F))
    x = jnp.asarray(rand(5, B, T, F))
    w = jnp.asarray(rand(6, B, T, H))

    def loss(fn):
        def f(p, x):
            ys, carry = fn(p, x)
            return jnp.sum(ys * w) + sum(jnp.sum(jnp.cos(c)) for c in jax.tree.leaves(carry))
        return f

    scan_fn = lambda p, x: layer.apply(p, {}, x)[0]
    v1, g1 = jax.jit(jax.value_and_grad(loss(scan_fn), argnums=(0, 1)))(params, x)
    v2, g2 = jax.jit(jax.value_and_grad(loss(loop), argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g2)


@pytest.mark.slow
@pytest.mark.parametrize("make", [
    lambda: nn.lstm(3, return_carry=True),
    lambda: nn.gru(3, reverse=True),
    lambda: nn.lstm(2, bidirectional=True),
], ids=["lstm", "gru_reverse", "bilstm"])
def test_check_grads_small_case_with_lengths(make):
    layer = make()
    with jax.enable_x64(True):
        params, _, _ = layer.init(KEY, (2, 4, 3))
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        x = jnp.asarray(rand(7, 2, 4, 3), jnp.float64)
        lengths = jnp.array([4, 2])
        f = jax.jit(lambda p, x: layer.apply(p, {}, (x, lengths))[0])
        check_grads(f, (params, x), order=1, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_unroll_does_not_change_results():
    x = jnp.asarray(rand(8, B, T, F))
    lengths = jnp.array([5, 3, 0])
    params, _, _ = nn.lstm(H).init(KEY, (B, T, F))
    ref, _ = nn.lstm(H, return_carry=True).apply(params, {}, (x, lengths))
    for u in (2, 3, 5):
        got, _ = nn.lstm(H, unroll=u, return_carry=True).apply(params, {}, (x, lengths))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, ref)


# --------------------------------------------------------------------------
# Masking with lengths


LENGTHS = [5, 3, 1, 0]


@pytest.mark.slow
@pytest.mark.parametrize("kind,reverse,time_major", [
    ("lstm", False, False), ("lstm", True, True), ("gru", True, False), ("gru", False, True)])
def test_lengths_equal_running_each_sequence_alone(kind, reverse, time_major):
    make = nn.lstm if kind == "lstm" else nn.gru
    layer = make(H, reverse=reverse, time_major=time_major, return_carry=True)
    single = make(H, reverse=reverse, return_carry=True)
    nb = len(LENGTHS)
    params, _, _ = layer.init(KEY, (nb, T, F) if not time_major else (T, nb, F))
    x = rand(9, nb, T, F)
    lengths = jnp.array(LENGTHS)
    xin = np.swapaxes(x, 0, 1) if time_major else x
    (ys, carry), _ = jax.jit(lambda p, x, n: layer.apply(p, {}, {"x": x, "lengths": n}))(
        params, jnp.asarray(xin), lengths)
    if time_major:
        ys = jnp.swapaxes(ys, 0, 1)
    for b, n in enumerate(LENGTHS):
        carry_b = jax.tree.map(lambda c: c[b], carry)
        if n == 0:
            jax.tree.map(lambda c: np.testing.assert_array_equal(c, 0.0), carry_b)
        else:
            (ref_ys, ref_carry), _ = single.apply(params, {}, jnp.asarray(x[b:b + 1, :n]))
            np.testing.assert_allclose(ys[b, :n], ref_ys[0], atol=1e-6)
            jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r[0], atol=1e-6), carry_b, ref_carry)
        np.testing.assert_array_equal(ys[b, n:], 0.0)  # padded outputs are zeros


@pytest.mark.slow
def test_padding_values_do_not_leak():
    layer = nn.gru(H, return_carry=True)
    params, _, _ = layer.init(KEY, (B, T, F))
    x = rand(10, B, T, F)
    lengths = jnp.array([2, 4, 5])
    x2 = x.copy()
    for b, n in enumerate([2, 4, 5]):
        x2[b, n:] = 1e6  # garbage in the padding
    out1, _ = layer.apply(params, {}, (jnp.asarray(x), lengths))
    out2, _ = layer.apply(params, {}, (jnp.asarray(x2), lengths))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), out1, out2)
    # and the gradient w.r.t. padded inputs is exactly zero
    g = jax.grad(lambda x: jnp.sum(layer.apply(params, {}, (x, lengths))[0][0]))(jnp.asarray(x))
    assert np.all(np.asarray(g)[0, 2:] == 0) and np.all(np.asarray(g)[1, 4:] == 0)


@pytest.mark.slow
def test_last_output_is_output_at_last_valid_step():
    layer = nn.lstm(H, return_sequences=False)
    params, _, _ = layer.init(KEY, (B, T, F))
    x = jnp.asarray(rand(11, B, T, F))
    lengths = jnp.array([5, 2, 3])
    last, _ = layer.apply(params, {}, (x, lengths))
    ys, _ = nn.lstm(H).apply(params, {}, (x, lengths))
    for b, n in enumerate([5, 2, 3]):
        np.testing.assert_allclose(last[b], ys[b, n - 1], atol=1e-6)


@pytest.mark.slow
def test_initial_carry_is_used():
    layer = nn.lstm(H, return_carry=True)
    params, _, _ = layer.init(KEY, (B, T, F))
    x = jnp.asarray(rand(12, B, T, F))
    (ys, carry), _ = layer.apply(params, {}, x)
    # running the first 2 steps, then the rest from the carry, equals one run
    (y1, c1), _ = layer.apply(params, {}, x[:, :2])
    (y2, c2), _ = layer.apply(params, {}, {"x": x[:, 2:], "carry": c1})
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), ys, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), c2, carry)


@pytest.mark.slow
def test_reverse_sequences_helper():
    x = jnp.arange(2 * 4).reshape(2, 4)[..., None]
    r = nn.reverse_sequences(x, jnp.array([3, 0]))
    np.testing.assert_array_equal(r[..., 0], [[2, 1, 0, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(nn.reverse_sequences(r, jnp.array([3, 0])), x)
    np.testing.assert_array_equal(
        nn.reverse_sequences(jnp.swapaxes(x, 0, 1), jnp.array([3, 0]), time_major=True), jnp.swapaxes(r, 0, 1))


# --------------------------------------------------------------------------
# Bidirectional and stacked


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_bidirectional_equals_forward_plus_reversed(kind, with_lengths):
    make = nn.lstm if kind == "lstm" else nn.gru
    layer = make(H, bidirectional=True, return_carry=True)
    nb = len(LENGTHS)
    params, _, out = layer.init(KEY, (nb, T, F))
    assert out[0] == (nb, T, 2 * H)
    x = jnp.asarray(rand(13, nb, T, F))
    lengths = jnp.array(LENGTHS if with_lengths else [T] * nb)
    inp = (x, lengths) if with_lengths else x
    (ys, (c_f, c_b)), _ = jax.jit(lambda p, i: layer.apply(p, {}, i))(params, inp)
    fwd, bwd = make(H, return_carry=True), make(H, reverse=True, return_carry=True)
    (y_f, rc_f), _ = fwd.apply(params["forward"], {}, inp)
    (y_b, rc_b), _ = bwd.apply(params["backward"], {}, inp)
    np.testing.assert_allclose(ys, jnp.concatenate([y_f, y_b], -1), atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), (c_f, c_b), (rc_f, rc_b))
    # and against the definition: the backward direction on each flipped prefix
    for b, n in enumerate(np.asarray(lengths)):
        if n == 0:
            continue
        y_ref, _ = make(H).apply(params["backward"], {}, x[b:b + 1, :n][:, ::-1])
        np.testing.assert_allclose(ys[b, :n, H:], y_ref[0, ::-1], atol=1e-6)
        np.testing.assert_array_equal(ys[b, n:], 0.0)


@pytest.mark.slow
def test_stacked_equals_layers_in_sequence_and_dropout():
    layer = nn.gru(H, num_layers=2, dropout=0.5, return_carry=True)
    params, _, out = layer.init(KEY, (B, T, F))
    assert set(params) == {"layer_0", "layer_1"} and out == ((B, T, H), ((B, H), (B, H)))
    x = jnp.asarray(rand(14, B, T, F))
    lengths = jnp.array([5, 1, 3])
    (ys, (h0, h1)), _ = layer.apply(params, {}, (x, lengths))
    one = nn.gru(H, return_carry=True)
    (y0, r0), _ = one.apply(params["layer_0"], {}, (x, lengths))
    (y1, r1), _ = one.apply(params["layer_1"], {}, (y0, lengths))
    np.testing.assert_allclose(ys, y1, atol=1e-6)
    np.testing.assert_allclose(h0, r0, atol=1e-6)
    np.testing.assert_allclose(h1, r1, atol=1e-6)
    # training mode drops units between layers: a different, key-dependent result
    (yt, _), _ = layer.apply(params, {}, (x, lengths), key=KEY, train=True)
    (yt2, _), _ = layer.apply(params, {}, (x, lengths), key=KEY, train=True)
    (yt3, _), _ = layer.apply(params, {}, (x, lengths), key=jax.random.key(1), train=True)
    assert not np.allclose(yt, ys) and np.allclose(yt, yt2) and not np.allclose(yt, yt3)
    with pytest.raises(nn.KeyMissingError, match="PRNG key"):
        layer.apply(params, {}, x, train=True)


def test_stacked_rejects_non_sequence_middle_layer():
    with pytest.raises(nn.ShapeError, match="return_sequences=True"):
        nn.stacked(nn.lstm(H, return_sequences=False), nn.lstm(H)).init(KEY, (B, T, F))


@pytest.mark.slow
def test_vmap_over_inputs_with_lengths():
    layer = nn.lstm(H, bidirectional=True)
    params, _, _ = layer.init(KEY, (B, T, F))
    xs = jnp.asarray(rand(15, 2, B, T, F))
    ls = jnp.array([[5, 2, 0], [1, 3, 4]])
    yv = jax.vmap(lambda x, n: layer.apply(params, {}, (x, n))[0])(xs, ls)
    for i in range(2):
        np.testing.assert_allclose(yv[i], layer.apply(params, {}, (xs[i], ls[i]))[0], atol=1e-6)


# --------------------------------------------------------------------------
# Errors


def test_wrong_feature_size_is_shape_error_with_expected_and_got():
    layer = nn.lstm(H)
    params, _, _ = layer.init(KEY, (B, T, F))
    with pytest.raises(nn.ShapeError) as err:
        layer.apply(params, {}, jnp.ones((B, T, F + 1)))
    assert f"(B, T, {F})" in str(err.value) and f"({B}, {T}, {F + 1})" in str(err.value)
    p, _, _ = nn.gru(H, time_major=True).init(KEY, (T, B, F))
    with pytest.raises(nn.ShapeError, match=rf"\(T, B, {F}\).*\(2, 3, 7\)"):
        nn.gru(H, time_major=True).apply(p, {}, jnp.ones((2, 3, 7)))


def test_wrong_rank_is_shape_error():
    layer = nn.gru(H)
    params, _, _ = layer.init(KEY, (B, T, F))
    with pytest.raises(nn.ShapeError, match=rf"rank 3.*\(3, {F}\) \(rank 2\)"):
        layer.apply(params, {}, jnp.ones((3, F)))
    with pytest.raises(nn.ShapeError, match="rank 3"):
        layer.init(KEY, (T, F))


def test_wrong_lengths_shape_and_path_in_model():
    model = nn.serial(nn.named("encoder", nn.lstm(H, bidirectional=True)), nn.dense(2))
    params, _, _ = model.init(KEY, (B, T, F))
    with pytest.raises(nn.ShapeError) as err:
        model.apply(params, {}, jnp.ones((B, T, 2)))
    assert "encoder/forward" in str(err.value) and f"(B, T, {F})" in str(err.value)
    layer = nn.gru(H)
    p, _, _ = layer.init(KEY, (B, T, F))
    with pytest.raises(nn.ShapeError, match=r"lengths of shape \(3,\)"):
        layer.apply(p, {}, (jnp.ones((B, T, F)), jnp.array([1, 2])))


def test_combinators_check_children_like_serial():
    """bidirectional/stacked use fundl.nn.children's helpers: unexpected params entries are errors,
    errors name the child's path, and nn.summary lists the children."""
    layer = nn.lstm(H, num_layers=2, bidirectional=True)
    params, _, _ = layer.init(KEY, (B, T, F))
    with pytest.raises(nn.ParamsError, match=r"unexpected params entries \['layer_2'\]"):
        layer.apply({**params, "layer_2": {}}, {}, jnp.ones((B, T, F)))
    bad = {**params, "layer_1": {**params["layer_1"], "extra": {}}}
    with pytest.raises(nn.ParamsError, match=r"layer_1.*unexpected params entries \['extra'\]"):
        layer.apply(bad, {}, jnp.ones((B, T, F)))
    rows = []
    nn.summary(nn.serial(nn.named("lstm", layer)), (B, T, F), print_fn=rows.append)
    for path in ("lstm/layer_0/forward", "lstm/layer_1/backward"):
        assert path in rows[0]
