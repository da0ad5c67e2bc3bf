"""Recurrent cells: one time step of an LSTM or a GRU, as pure functions.

A **cell** is a :class:`Cell`, a NamedTuple of pure functions::

    params = cell.init(key, input_size)                # plain dict of arrays
    carry  = cell.initial_carry(batch_shape, dtype)    # zeros
    carry, y_t = cell.step(params, carry, x_t)         # one time step

Cells know nothing of sequences: ``fundl.nn.sequence`` scans them over time
(:func:`fundl.nn.rnn`, :func:`fundl.nn.lstm`, :func:`fundl.nn.gru`).

Equations, gate order and default initialisation follow PyTorch's
``nn.LSTM``/``nn.GRU``, so weights port over (``fundl.interop.torch``) and
results agree to float32 precision.

**Matmul layout, chosen by measurement** (``benchmarks/bench_rnn_layouts.py``;
figures in docs/benchmarks.md, "LSTM"): the LSTM computes one fused
``concat([x_t, h]) @ w`` per step (hoisting ``x @ W_ih`` out of the scan
measured slower); the GRU computes ``x_t @ w_ih`` and ``h @ w_hh`` separately
inside the step (its reset gate multiplies the hidden projection, which a
fused matmul would have to pad with zero blocks; that measured slower).

Examples:
    >>> cell = nn.gru_cell(4)
    >>> params = cell.init(jax.random.key(0), 3)
    >>> h, y = cell.step(params, cell.initial_carry((2,)), jnp.ones((2, 3)))
    >>> y.shape, bool((h == y).all())
    ((2, 4), True)
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fundl.nn import flat_random
from fundl.nn.core import ParamsError, get_param

__all__ = ["Cell", "lstm_cell", "gru_cell", "check_hidden"]


class Cell(NamedTuple):
    """A recurrent cell: pure functions over a carry.

    * ``init(key, input_size, dtype=float32) -> params``
    * ``initial_carry(batch_shape, dtype=float32) -> carry`` (zeros)
    * ``step(params, carry, x_t) -> (carry, y_t)``; ``x_t`` is ``(..., input_size)``
    * ``output(carry) -> y``: the output a step leaves in ``carry`` (``h``)
    * ``input_size(params) -> int``: the feature size the params expect
    * ``carry_shape(batch_shape) -> shapes``: ``initial_carry``'s shapes

    Examples:
        >>> cell = nn.lstm_cell(4)
        >>> params = cell.init(jax.random.key(0), 3)                 # input size 3
        >>> carry = cell.initial_carry((2,))                         # batch of 2: (h, c)
        >>> carry, y = cell.step(params, carry, jnp.ones((2, 3)))    # one time step
        >>> y.shape, jax.tree.map(jnp.shape, carry)
        ((2, 4), ((2, 4), (2, 4)))
    """

    init: Callable
    initial_carry: Callable
    step: Callable
    output: Callable
    input_size: Callable
    carry_shape: Callable
    hidden: int
    name: str


def check_hidden(fn: str, hidden) -> None:
    """Raise ValueError unless ``hidden`` is a positive int; ``fn`` names the caller in the message."""
    if not isinstance(hidden, (int, np.integer)) or isinstance(hidden, bool) or hidden <= 0:
        raise ValueError(f"{fn}: hidden must be a positive int, got {hidden!r}")


def _uniform(key, shape, bound, dtype):
    return flat_random.uniform(key, shape, dtype, -bound, bound)


def _weight(params, name, shape_hint: str):
    w = get_param(params, name)
    if jnp.ndim(w) != 2 and name.startswith("w"):
        raise ParamsError(f"expected params['{name}'] of shape {shape_hint}, got shape {jnp.shape(w)}")
    return w


# --------------------------------------------------------------------------
# LSTM


def lstm_cell(hidden: int, *, forget_bias: float = 1.0) -> Cell:
    """The LSTM cell of ``torch.nn.LSTM`` (no peepholes, no projection).

    Gate order **i, f, g, o** (input, forget, cell candidate, output)::

        z = concat([x_t, h]) @ w + b                  # (..., 4H)
        i, f, g, o = split(z, 4)
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = sigmoid(o) * tanh(c')
        carry = (h', c'),  y_t = h'

    Params: ``w`` of shape ``(F + H, 4H)`` whose first ``F`` rows are torch's
    ``weight_ih.T`` and last ``H`` rows ``weight_hh.T``; ``b`` of shape
    ``(4H,)`` equal to torch's ``bias_ih + bias_hh``.  Columns are the gates
    in the order i, f, g, o, ``H`` each.

    Init: every weight ``U(-1/sqrt(H), 1/sqrt(H))`` as in torch; ``b`` is the
    sum of two independent draws from that distribution (torch's two biases),
    plus ``forget_bias`` on the f block.  ``forget_bias=1.0`` (the default,
    per the common practice of Jozefowicz et al. 2015) shifts the forget-gate
    bias by 1 at init only; ``forget_bias=0.0`` gives exactly torch's default
    init distribution.  Ported torch weights are used as given either way.
    """
    check_hidden("lstm_cell", hidden)
    H = int(hidden)

    def init(key, input_size, dtype=jnp.float32):
        k_w, k_b1, k_b2 = jax.random.split(key, 3)
        bound = 1.0 / math.sqrt(H)
        w = _uniform(k_w, (input_size + H, 4 * H), bound, dtype)
        b = _uniform(k_b1, (4 * H,), bound, dtype) + _uniform(k_b2, (4 * H,), bound, dtype)
        b = b.at[H:2 * H].add(jnp.asarray(forget_bias, dtype))
        return {"w": w, "b": b}

    def initial_carry(batch_shape, dtype=jnp.float32):
        z = jnp.zeros(tuple(batch_shape) + (H,), dtype)
        return (z, z)

    def step(params, carry, x_t):
        w, b = _weight(params, "w", f"(F + {H}, {4 * H})"), get_param(params, "b")
        h, c = carry
        z = jnp.concatenate([x_t, h], axis=-1) @ w.astype(x_t.dtype) + b.astype(x_t.dtype)
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    def input_size(params):
        w = _weight(params, "w", f"(F + {H}, {4 * H})")
        if w.shape[1] != 4 * H or w.shape[0] < H:
            raise ParamsError(
                f"expected params['w'] of shape (F + {H}, {4 * H}) for an LSTM of hidden size {H}, "
                f"got shape {tuple(w.shape)}")
        return w.shape[0] - H

    def carry_shape(batch_shape):
        s = tuple(batch_shape) + (H,)
        return (s, s)

    return Cell(init, initial_carry, step, lambda carry: carry[0], input_size, carry_shape, H, "lstm")


# --------------------------------------------------------------------------
# GRU


def gru_cell(hidden: int) -> Cell:
    """The GRU cell of ``torch.nn.GRU``.

    Gate order **r, z, n** (reset, update, new)::

        r = sigmoid(x_t @ W_ir + b_ir + h @ W_hr + b_hr)
        z = sigmoid(x_t @ W_iz + b_iz + h @ W_hz + b_hz)
        n = tanh(x_t @ W_in + b_in + r * (h @ W_hn + b_hn))
        h' = (1 - z) * n + z * h
        carry = h',  y_t = h'

    Note that the reset gate multiplies the hidden projection *including its
    bias* ``b_hn`` (torch's convention, ``reset_after``), which is why the
    hidden bias is kept apart from the input bias.

    Params (torch's tensors transposed): ``w_ih`` (F, 3H), ``w_hh`` (H, 3H),
    ``b_ih`` (3H,), ``b_hh`` (3H,); columns are the gates r, z, n, ``H`` each.
    Init: all four ``U(-1/sqrt(H), 1/sqrt(H))``, as torch.
    """
    check_hidden("gru_cell", hidden)
    H = int(hidden)

    def init(key, input_size, dtype=jnp.float32):
        ks = jax.random.split(key, 4)
        bound = 1.0 / math.sqrt(H)
        return {
            "w_ih": _uniform(ks[0], (input_size, 3 * H), bound, dtype),
            "w_hh": _uniform(ks[1], (H, 3 * H), bound, dtype),
            "b_ih": _uniform(ks[2], (3 * H,), bound, dtype),
            "b_hh": _uniform(ks[3], (3 * H,), bound, dtype),
        }

    def initial_carry(batch_shape, dtype=jnp.float32):
        return jnp.zeros(tuple(batch_shape) + (H,), dtype)

    def step(params, h, x_t):
        dt = x_t.dtype
        gx = x_t @ _weight(params, "w_ih", f"(F, {3 * H})").astype(dt) + get_param(params, "b_ih").astype(dt)
        gh = h @ _weight(params, "w_hh", f"({H}, {3 * H})").astype(dt) + get_param(params, "b_hh").astype(dt)
        xr, xz, xn = jnp.split(gx, 3, axis=-1)
        hr, hz, hn = jnp.split(gh, 3, axis=-1)
        r = jax.nn.sigmoid(xr + hr)
        z = jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        h = (1.0 - z) * n + z * h
        return h, h

    def input_size(params):
        w = _weight(params, "w_ih", f"(F, {3 * H})")
        if w.shape[1] != 3 * H:
            raise ParamsError(
                f"expected params['w_ih'] of shape (F, {3 * H}) for a GRU of hidden size {H}, "
                f"got shape {tuple(w.shape)}")
        return w.shape[0]

    def carry_shape(batch_shape):
        return tuple(batch_shape) + (H,)

    return Cell(init, initial_carry, step, lambda carry: carry, input_size, carry_shape, H, "gru")
