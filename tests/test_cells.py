"""Recurrent cells (fundl.nn.cells): torch's default init distribution, forget bias, params errors.

Their numerics are tested through the sequence layers that scan them (test_sequence.py) and
against PyTorch (test_interop_torch.py).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fundl import nn

KEY = jax.random.key(0)
B, T, F, H = 3, 5, 4, 6


@pytest.mark.slow
def test_default_init_matches_torch_distribution():
    h, f = 64, 10
    k = 1 / math.sqrt(h)
    p = nn.lstm_cell(h, forget_bias=0.0).init(KEY, f)
    w, b = np.asarray(p["w"]), np.asarray(p["b"])
    assert np.abs(w).max() <= k and np.abs(w).max() > 0.99 * k
    np.testing.assert_allclose(w.std(), k / math.sqrt(3), rtol=0.05)  # U(-k, k)
    # b = b_ih + b_hh: the sum of two U(-k, k), in [-2k, 2k], std k*sqrt(2/3)
    assert np.abs(b).max() <= 2 * k
    np.testing.assert_allclose(b.std(), k * math.sqrt(2 / 3), rtol=0.15)
    # default forget_bias=1 shifts only the f block (gate order i, f, g, o)
    p1 = nn.lstm_cell(h).init(KEY, f)
    np.testing.assert_allclose(p1["b"][h:2 * h] - p["b"][h:2 * h], 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.delete(p1["b"], np.s_[h:2 * h]), np.delete(b, np.s_[h:2 * h]))
    np.testing.assert_array_equal(p1["w"], w)
    g = nn.gru_cell(h).init(KEY, f)
    for name, shape in [("w_ih", (f, 3 * h)), ("w_hh", (h, 3 * h)), ("b_ih", (3 * h,)), ("b_hh", (3 * h,))]:
        a = np.asarray(g[name])
        assert a.shape == shape and np.abs(a).max() <= k and np.abs(a).max() > 0.95 * k


@pytest.mark.slow
def test_params_errors_are_clear():
    layer = nn.lstm(H)
    with pytest.raises(nn.ParamsError, match="missing params entry 'w'"):
        layer.apply({"b": jnp.zeros(4 * H)}, {}, jnp.ones((B, T, F)))
    with pytest.raises(nn.ParamsError, match="hidden size"):
        layer.apply(nn.lstm(H + 1).init(KEY, (B, T, F))[0], {}, jnp.ones((B, T, F)))
