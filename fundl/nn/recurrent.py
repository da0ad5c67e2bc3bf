"""Recurrent layers: LSTM/GRU cells as pure step functions, run by ``jax.lax.scan``.

A **cell** is a :class:`Cell`, a NamedTuple of pure functions::

    params = cell.init(key, input_size)                # plain dict of arrays
    carry  = cell.initial_carry(batch_shape, dtype)    # zeros
    carry, y_t = cell.step(params, carry, x_t)         # one time step

A **sequence layer** (:func:`rnn`, :func:`lstm`, :func:`gru`) is an ordinary
:class:`~fundl.nn.core.Layer` that scans a cell over the time axis, with
batch-major ``(B, T, F)`` or time-major ``(T, B, F)`` input, ``reverse``,
``unroll``, per-example sequence ``lengths`` (masking), and the choice of
returning all outputs and/or the final carry.  :func:`bidirectional` and
:func:`stacked` compose sequence layers; ``lstm(h, num_layers=2,
bidirectional=True, dropout=0.1)`` builds the PyTorch-style stack.

Equations, gate order and default initialisation follow PyTorch's
``nn.LSTM``/``nn.GRU``, so weights port over with
:func:`lstm_params_from_torch`/:func:`gru_params_from_torch` and results agree
to float32 precision.

**Matmul layout, chosen by measurement** (``scripts/bench_rnn_layouts.py``, a
training step with Adam, 28 steps, 128 units, batch 128 on the 2-core CPU):
the LSTM computes one fused ``concat([x_t, h]) @ w`` per step with ``unroll=1``
(hoisting ``x @ W_ih`` out of the scan was about half as fast, unrolling
slower); the GRU computes ``x_t @ w_ih`` and ``h @ w_hh`` separately inside the
step (its reset gate multiplies the hidden projection, which a fused matmul
would have to pad with zero blocks; that measured slower).

Examples:
    >>> layer = nn.lstm(64)                                 # (B, T, F) -> (B, T, 64)
    >>> params, state, out_shape = layer.init(jax.random.key(0), (8, 20, 16))
    >>> x, lengths = jnp.ones((8, 20, 16)), jnp.full((8,), 15)
    >>> y, _ = layer.apply(params, state, x)                # all outputs
    >>> y, _ = layer.apply(params, state, (x, lengths))     # steps 15.. are padding
    >>> out_shape, y.shape, float(abs(y[:, 15:]).max())
    ((8, 20, 64), (8, 20, 64), 0.0)
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fundl.nn.core import (
    KeyMissingError, Layer, ParamsError, ShapeError, _apply_child, _check_keys, _fmt, _init_child, get_param,
)

__all__ = [
    "Cell", "lstm_cell", "gru_cell", "rnn", "lstm", "gru", "bidirectional", "stacked",
    "lstm_params_from_torch", "gru_params_from_torch", "reverse_sequences",
]


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


def _check_hidden(fn: str, hidden) -> None:
    if not isinstance(hidden, (int, np.integer)) or isinstance(hidden, bool) or hidden <= 0:
        raise ValueError(f"{fn}: hidden must be a positive int, got {hidden!r}")


def _uniform(key, shape, bound, dtype):
    return jax.random.uniform(key, shape, dtype, -bound, bound)


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
    _check_hidden("lstm_cell", hidden)
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
    _check_hidden("gru_cell", hidden)
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


# --------------------------------------------------------------------------
# Porting weights from PyTorch


def _torch_get(sd, name):
    if name not in sd:
        raise KeyError(f"state dict has no '{name}'; it has {sorted(sd)}")
    v = sd[name]
    if hasattr(v, "detach"):  # a torch tensor slipped in: accept it
        v = v.detach().cpu().numpy()
    return np.asarray(v, dtype=np.float32)


def _torch_suffix(layer: int, direction: int | str) -> str:
    if direction in (0, "forward", "fwd"):
        return f"_l{layer}"
    if direction in (1, "backward", "bwd", "reverse"):
        return f"_l{layer}_reverse"
    raise ValueError(f"direction must be 'forward'/0 or 'backward'/1, got {direction!r}")


def lstm_params_from_torch(state_dict, layer: int = 0, direction: int | str = "forward") -> dict:
    """fundl LSTM cell params from a ``torch.nn.LSTM`` state dict (NumPy arrays in).

    ``state_dict`` maps torch's names (``weight_ih_l0``, ``weight_hh_l0``,
    ``bias_ih_l0``, ``bias_hh_l0``, with ``_reverse`` for the backward
    direction) to arrays, e.g. ``{k: v.numpy() for k, v in m.state_dict().items()}``.
    Returns ``{"w": concat([W_ih.T, W_hh.T]), "b": b_ih + b_hh}``.
    A module built with ``bias=False`` gives ``b = 0``.
    """
    s = _torch_suffix(layer, direction)
    w_ih, w_hh = _torch_get(state_dict, "weight_ih" + s), _torch_get(state_dict, "weight_hh" + s)
    if "bias_ih" + s in state_dict:
        b = _torch_get(state_dict, "bias_ih" + s) + _torch_get(state_dict, "bias_hh" + s)
    else:
        b = np.zeros(w_ih.shape[0], np.float32)
    if w_hh.shape[0] != w_hh.shape[1] * 4:
        raise ValueError(f"weight_hh{s} has shape {w_hh.shape}; projections (proj_size) are not supported")
    return {"w": jnp.asarray(np.concatenate([w_ih.T, w_hh.T], 0)), "b": jnp.asarray(b)}


def gru_params_from_torch(state_dict, layer: int = 0, direction: int | str = "forward") -> dict:
    """fundl GRU cell params from a ``torch.nn.GRU`` state dict (NumPy arrays in).

    Returns ``{"w_ih": W_ih.T, "w_hh": W_hh.T, "b_ih": b_ih, "b_hh": b_hh}``
    (zeros for a module built with ``bias=False``).
    """
    s = _torch_suffix(layer, direction)
    w_ih, w_hh = _torch_get(state_dict, "weight_ih" + s), _torch_get(state_dict, "weight_hh" + s)
    if "bias_ih" + s in state_dict:
        b_ih, b_hh = _torch_get(state_dict, "bias_ih" + s), _torch_get(state_dict, "bias_hh" + s)
    else:
        b_ih = b_hh = np.zeros(w_ih.shape[0], np.float32)
    return {"w_ih": jnp.asarray(w_ih.T), "w_hh": jnp.asarray(w_hh.T),
            "b_ih": jnp.asarray(b_ih), "b_hh": jnp.asarray(b_hh)}


# --------------------------------------------------------------------------
# Inputs: x, (x, lengths) or {"x": x, "lengths": lengths, "carry": carry}


def _split_input(x):
    """(x, lengths or None, initial carry or None) from the accepted input forms."""
    if isinstance(x, dict):
        extra = sorted(set(x) - {"x", "lengths", "carry"})
        if "x" not in x or extra:
            raise ShapeError(
                f"a dict input needs key 'x' and may have 'lengths' and 'carry'; got keys {sorted(x)}")
        return x["x"], x.get("lengths"), x.get("carry")
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ShapeError(f"a tuple input must be (x, lengths), got a tuple of length {len(x)}")
        return x[0], x[1], None
    return x, None, None


def _split_shape(input_shape):
    """The shape of ``x`` from an input shape given as ``shape``, ``(shape, lengths_shape)`` or a dict."""
    if isinstance(input_shape, dict):
        return tuple(get_param(input_shape, "x", "input shape"))
    input_shape = tuple(input_shape)
    if input_shape and isinstance(input_shape[0], (tuple, list)):
        return tuple(input_shape[0])
    return input_shape


def _time_axes(time_major):
    return (0, 1) if time_major else (1, 0)  # (time axis, batch axis)


def _check_lengths(lengths, x, time_major):
    t_ax, b_ax = _time_axes(time_major)
    if jnp.ndim(lengths) != 1 or jnp.shape(lengths)[0] != x.shape[b_ax]:
        raise ShapeError(
            f"expected lengths of shape ({x.shape[b_ax]},) (one per example), "
            f"got shape {tuple(jnp.shape(lengths))}")
    if not jnp.issubdtype(jnp.asarray(lengths).dtype, jnp.integer):
        raise ShapeError(f"expected integer lengths, got dtype {jnp.asarray(lengths).dtype}")


def reverse_sequences(x, lengths=None, *, time_major=False):
    """Reverse each sequence in time over its valid prefix; padding stays in place.

    Without ``lengths`` this is a flip of the time axis.  With ``lengths``,
    position ``t < len`` takes ``x[len - 1 - t]`` and ``t >= len`` keeps
    ``x[t]``; the map is its own inverse.  Works on any array whose first two
    axes are (batch, time) (or (time, batch) with ``time_major``).

    Examples:
        >>> nn.reverse_sequences(jnp.arange(6.0)[None, :], jnp.array([4]))
        Array([[3., 2., 1., 0., 4., 5.]], dtype=float32)
    """
    t_ax, b_ax = _time_axes(time_major)
    if lengths is None:
        return jnp.flip(x, axis=t_ax)
    T = x.shape[t_ax]
    t = jnp.arange(T)[None, :]                         # (1, T)
    n = jnp.asarray(lengths)[:, None]                  # (B, 1)
    idx = jnp.where(t < n, n - 1 - t, t)               # (B, T)
    if time_major:
        idx = idx.T                                    # (T, B)
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=t_ax)


# --------------------------------------------------------------------------
# The sequence layer


@functools.partial(jax.jit, static_argnames=("cell", "time_major", "reverse", "unroll", "collect"))
def _scan_cell(params, carry0, x, lengths, *, cell, time_major, reverse, unroll, collect=True):
    """Scan ``cell`` over time; returns (final carry, ys in the input's layout).

    With ``collect=False`` the outputs are not stacked (``ys`` is None).

    Jitted (and inlined when called under an outer ``jit``) so that eager
    calls of one layer compile the scan once per input shape.
    """
    xs = x if time_major else jnp.swapaxes(x, 0, 1)            # (T, B, F)
    if lengths is None:
        def body(carry, x_t):
            carry, y = cell.step(params, carry, x_t)
            return carry, (y if collect else None)

        carry, ys = jax.lax.scan(body, carry0, xs, reverse=reverse, unroll=unroll)
    else:
        mask = jnp.arange(xs.shape[0])[:, None] < jnp.asarray(lengths)[None, :]  # (T, B)

        def body(carry, inp):
            x_t, m = inp
            new, y = cell.step(params, carry, x_t)
            m = m[:, None]
            carry = jax.tree.map(lambda a, b: jnp.where(m, a, b), new, carry)
            return carry, (jnp.where(m, y, jnp.zeros((), y.dtype)) if collect else None)

        # In reverse, the padded steps t >= len come first and are skipped,
        # so each sequence starts at its own last valid step.
        carry, ys = jax.lax.scan(body, carry0, (xs, mask), reverse=reverse, unroll=unroll)
    if collect and not time_major:
        ys = jnp.swapaxes(ys, 0, 1)
    return carry, ys


def rnn(cell: Cell, *, time_major: bool = False, reverse: bool = False, unroll: int = 1,
        return_sequences: bool = True, return_carry: bool = False, name: str | None = None) -> Layer:
    """Run ``cell`` over the time axis with ``jax.lax.scan``.

    Input ``x``: ``(B, T, F)``, or ``(T, B, F)`` with ``time_major=True``;
    ``init``'s ``input_shape`` includes the batch axis the same way.  ``x``
    may also be ``(x, lengths)`` or ``{"x": x, "lengths": lengths, "carry":
    initial_carry}`` (each key but ``x`` optional), with ``lengths`` an integer
    array of shape ``(B,)``.  Steps ``t >= lengths[b]`` are padding: they leave
    the carry unchanged and output zeros.  The initial carry defaults to zeros.

    ``reverse=True`` runs from the last step to the first and returns outputs
    aligned with the input's time axis; with ``lengths`` each sequence is
    reversed over its own valid steps (like a packed sequence in torch), so
    its first processed step is ``lengths[b] - 1``.

    ``apply`` returns ``(out, {})`` with ``out``:

    | return_sequences | return_carry | out |
    |---|---|---|
    | True (default) | False | ``ys``: (B, T, H) (or (T, B, H)) |
    | True | True | ``(ys, carry)`` |
    | False | True | ``carry`` |
    | False | False | last output ``(B, H)``: ``h`` after the last valid step (for ``reverse``, after step 0) |

    ``carry`` is the final carry, after each sequence's last valid step:
    ``(h, c)`` for an LSTM, ``h`` for a GRU, each ``(B, H)``.

    ``unroll`` is passed to ``lax.scan``; 1 measured fastest on CPU.

    Examples:
        >>> layer = nn.rnn(nn.gru_cell(8), return_sequences=False)     # the last valid output
        >>> params, state, out_shape = layer.init(jax.random.key(0), (1, 5, 3))
        >>> y, _ = layer.apply(params, state, (jnp.ones((2, 5, 3)), jnp.array([5, 2])))
        >>> out_shape, y.shape
        ((1, 8), (2, 8))
    """
    if not isinstance(cell, Cell):
        raise TypeError(f"rnn expects a Cell (e.g. nn.lstm_cell(64)), got {type(cell).__name__}")
    t_ax, b_ax = _time_axes(time_major)

    def init(key, input_shape):
        shape = _split_shape(input_shape)
        if len(shape) != 3:
            layout = "(T, B, F)" if time_major else "(B, T, F)"
            raise ShapeError(f"{cell.name} expects an input shape {layout} of rank 3, got {_fmt(shape)}")
        params = cell.init(key, shape[2])
        B, T = shape[b_ax], shape[t_ax]
        carry = cell.carry_shape((B,))
        seq = (T, B, cell.hidden) if time_major else (B, T, cell.hidden)
        if return_sequences:
            out = (seq, carry) if return_carry else seq
        else:
            out = carry if return_carry else (B, cell.hidden)
        return params, {}, out

    def apply(params, state, x, *, key=None, train=False):
        x, lengths, carry0 = _split_input(x)
        F = cell.input_size(params)
        layout = ("T", "B") if time_major else ("B", "T")
        if jnp.ndim(x) != 3 or jnp.shape(x)[-1] != F:
            raise ShapeError(
                f"expected input of shape ({layout[0]}, {layout[1]}, {F}) (rank 3), "
                f"got shape {_fmt(jnp.shape(x))} (rank {jnp.ndim(x)})")
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ShapeError(f"expected a floating-point input, got dtype {x.dtype}")
        B = x.shape[b_ax]
        if carry0 is None:
            carry0 = cell.initial_carry((B,), x.dtype)
        else:
            got = jax.tree.map(lambda a: tuple(jnp.shape(a)), carry0)
            want = cell.carry_shape((B,))
            if got != want:
                raise ShapeError(f"expected an initial carry of shapes {want}, got {got}")
        if lengths is not None:
            _check_lengths(lengths, x, time_major)
        carry, ys = _scan_cell(params, carry0, x, lengths, cell=cell, time_major=time_major,
                               reverse=reverse, unroll=unroll, collect=return_sequences)
        if not return_sequences:
            return (carry if return_carry else cell.output(carry)), {}
        return ((ys, carry) if return_carry else ys), {}

    return Layer(init, apply, name or cell.name)


# --------------------------------------------------------------------------
# Composition: bidirectional and stacked sequence layers


def _parts(out, seq_rank):
    """Split a sequence layer's output into (main output or None, carry or None).

    ``out`` is an array (sequence or last output), ``(sequence, carry)``, or a
    carry alone (anything else, e.g. an LSTM's ``(h, c)``).
    """
    if isinstance(out, tuple) and len(out) == 2 and hasattr(out[0], "ndim") and out[0].ndim == seq_rank:
        return out[0], out[1], True
    if hasattr(out, "ndim"):
        return out, None, False
    return None, out, False


def _merge(a, b, merge):
    if merge == "concat":
        return jnp.concatenate([a, b], axis=-1)
    if merge == "add":
        return a + b
    if merge == "mul":
        return a * b
    if merge == "mean":
        return (a + b) / 2
    return (a, b)


def _merge_shape(a, b, merge):
    if merge == "tuple":
        return (a, b)
    if tuple(a[:-1]) != tuple(b[:-1]) or (merge != "concat" and a[-1] != b[-1]):
        raise ShapeError(f"cannot merge directions with {merge!r}: output shapes {a} and {b}")
    return tuple(a[:-1]) + ((a[-1] + b[-1],) if merge == "concat" else (a[-1],))


def _is_shape(s):
    return isinstance(s, tuple) and all(isinstance(d, (int, np.integer)) for d in s)


def _shape_parts(out, seq_rank):
    """:func:`_parts` for the output shapes ``init`` returns."""
    if isinstance(out, tuple) and len(out) == 2 and _is_shape(out[0]) and len(out[0]) == seq_rank:
        return out[0], out[1], True
    if _is_shape(out):
        return out, None, False
    return None, out, False


_BIDI_MERGES = ("concat", "add", "mul", "mean", "tuple")


def _init_stateless(layer, name, key, shape):
    """Core's child init, for children without state (the only kind scanned here)."""
    p, s, out = _init_child(layer, name, key, shape)
    if s:
        raise ValueError(f"{name}: recurrent combinators support only stateless layers, got state {s}")
    return p, out


def bidirectional(forward_layer: Layer, backward_layer: Layer | None = None, *,
                  merge: str = "concat", time_major: bool = False, name: str = "bidirectional") -> Layer:
    """Run ``forward_layer`` on the sequence and ``backward_layer`` on it reversed.

    Both are sequence layers (e.g. :func:`lstm`) built *forward* (``reverse=False``)
    with the same ``return_sequences``/``return_carry``/``time_major``; pass
    the same ``time_major`` here.  ``backward_layer`` defaults to a
    structurally identical copy of ``forward_layer`` with its own params.
    The backward branch sees each sequence reversed over its valid prefix
    (see :func:`reverse_sequences`, so ``lengths`` work like torch's packed
    sequences) and its output sequence is reversed back, so ``ys[:, t]``
    holds both directions' outputs for step ``t``.

    Output: each direction's main output (sequence or last output) is merged
    with ``merge`` (``"concat"`` on the feature axis, ``"add"``, ``"mul"``,
    ``"mean"``, or ``"tuple"``); carries are never merged but returned as
    ``(carry_fwd, carry_bwd)``.  So with ``return_carry=True`` the output is
    ``(merged_ys, (carry_fwd, carry_bwd))``, and a carry-only layer gives
    ``(carry_fwd, carry_bwd)``.  Params: ``{"forward": ..., "backward": ...}``.

    Examples:
        >>> layer = nn.bidirectional(nn.rnn(nn.lstm_cell(8)))
        >>> params, state, out_shape = layer.init(jax.random.key(0), (1, 5, 3))
        >>> sorted(params), out_shape                    # "concat": 2 x 8 features
        (['backward', 'forward'], (1, 5, 16))
    """
    if merge not in _BIDI_MERGES:
        raise ValueError(f"merge must be one of {_BIDI_MERGES}, got {merge!r}")
    backward_layer = forward_layer if backward_layer is None else backward_layer

    def init(key, input_shape):
        k_f, k_b = jax.random.split(key)
        p_f, out_f = _init_stateless(forward_layer, "forward", k_f, input_shape)
        p_b, out_b = _init_stateless(backward_layer, "backward", k_b, input_shape)
        rank = len(_split_shape(input_shape))
        y_f, c_f, pair = _shape_parts(out_f, rank)
        y_b, c_b, _ = _shape_parts(out_b, rank)
        if (y_f is None) != (y_b is None) or (c_f is None) != (c_b is None):
            raise ValueError("bidirectional: the two directions must return the same kind of output")
        y = None if y_f is None else _merge_shape(y_f, y_b, merge)
        c = None if c_f is None else (c_f, c_b)
        out = (y, c) if pair else (y if c is None else c)
        return {"forward": p_f, "backward": p_b}, {}, out

    def apply(params, state, x, *, key=None, train=False):
        xx, lengths, carry0 = _split_input(x)
        if carry0 is not None:
            raise ShapeError("bidirectional does not take an initial carry; pass x or (x, lengths)")
        if jnp.ndim(xx) != 3:
            raise ShapeError(f"expected input of rank 3, got shape {_fmt(jnp.shape(xx))} (rank {jnp.ndim(xx)})")
        if lengths is not None:
            _check_lengths(lengths, xx, time_major)
        _check_keys(params, ("forward", "backward"), "params")
        k_f, k_b = (None, None) if key is None else jax.random.split(key)
        x_rev = reverse_sequences(xx, lengths, time_major=time_major)
        fwd, _ = _apply_child(forward_layer, "forward", params, {},
                              xx if lengths is None else (xx, lengths), k_f, train)
        bwd, _ = _apply_child(backward_layer, "backward", params, {},
                              x_rev if lengths is None else (x_rev, lengths), k_b, train)
        y_f, c_f, pair = _parts(fwd, xx.ndim)
        y_b, c_b, _ = _parts(bwd, xx.ndim)
        y = None
        if y_f is not None:
            if y_b.ndim == xx.ndim:  # a sequence: realign in time
                y_b = reverse_sequences(y_b, lengths, time_major=time_major)
            y = _merge(y_f, y_b, merge)
        c = None if c_f is None else (c_f, c_b)
        return ((y, c) if pair else (y if c is None else c)), {}

    return Layer(init, apply, name)


def _with_lengths(input_shape, x_shape):
    """``input_shape`` with its ``x`` part replaced by ``x_shape`` (lengths kept)."""
    if isinstance(input_shape, dict):
        return {**input_shape, "x": x_shape}
    if input_shape and isinstance(input_shape[0], (tuple, list)):
        return (x_shape,) + tuple(input_shape[1:])
    return x_shape


def stacked(*layers: Layer, dropout: float = 0.0, name: str = "stacked") -> Layer:
    """Sequence layers in series: layer ``k + 1`` reads layer ``k``'s output sequence.

    ``lengths`` (if given) go to every layer.  Every layer but the last must
    return its sequence, either alone or as ``(ys, carry)``.  Output: if the
    last layer returns ``(ys, carry)``, the result is ``(ys, (carry_0, ...,
    carry_{L-1}))`` with the carries of all layers that return one; otherwise
    it is the last layer's output as is.

    ``dropout`` (the drop probability) is applied to the sequences between
    layers (not after the last) when ``train=True``; it then needs a ``key``.
    Params: ``{"layer_0": ..., "layer_1": ...}``.

    Examples:
        >>> layer = nn.stacked(nn.lstm(8), nn.gru(4), dropout=0.2)
        >>> params, state, out_shape = layer.init(jax.random.key(0), (1, 5, 3))
        >>> sorted(params), out_shape
        (['layer_0', 'layer_1'], (1, 5, 4))
    """
    if not layers:
        raise ValueError("stacked needs at least one layer")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout is the drop probability and must be in [0, 1), got {dropout}")
    names = [f"layer_{k}" for k in range(len(layers))]

    def init(key, input_shape):
        params, carries = {}, []
        rank = len(_split_shape(input_shape))
        cur = input_shape
        for k, (layer, nm) in enumerate(zip(layers, names)):
            p, out = _init_stateless(layer, nm, jax.random.fold_in(key, k), cur)
            params[nm] = p
            y, c, pair = _shape_parts(out, rank)
            if k < len(layers) - 1:
                if y is None or len(y) != rank:
                    raise ShapeError(
                        f"stacked: layer '{nm}' must return sequences of rank {rank} for the next "
                        f"layer, got output shape {out}; build it with return_sequences=True")
                cur = _with_lengths(input_shape, y)
            if pair:
                carries.append(c)
        return params, {}, ((y, tuple(carries)) if pair else out)

    def apply(params, state, x, *, key=None, train=False):
        xx, lengths, carry0 = _split_input(x)
        if carry0 is not None:
            raise ShapeError("stacked does not take an initial carry; pass x or (x, lengths)")
        if train and dropout > 0 and len(layers) > 1 and key is None:
            raise KeyMissingError(
                "stacked recurrent layers with dropout in training mode need a PRNG key: call "
                "apply(params, state, x, key=jax.random.key(...), train=True), or pass train=False")
        _check_keys(params, names, "params")
        rank = jnp.ndim(xx)
        carries, y = [], xx
        for k, (layer, nm) in enumerate(zip(layers, names)):
            if k > 0 and train and dropout > 0:
                keep = jax.random.bernoulli(jax.random.fold_in(key, 2 * k), 1.0 - dropout, y.shape)
                y = jnp.where(keep, y / (1.0 - dropout), jnp.zeros((), y.dtype))
            k_layer = None if key is None else jax.random.fold_in(key, 2 * k + 1)
            out, _ = _apply_child(layer, nm, params, {}, y if lengths is None else (y, lengths), k_layer, train)
            y, c, pair = _parts(out, rank)
            if k < len(layers) - 1 and (y is None or y.ndim != rank):
                raise ShapeError(f"stacked: layer '{nm}' must return sequences of rank {rank}")
            if pair:
                carries.append(c)
        return ((y, tuple(carries)) if pair else out), {}

    return Layer(init, apply, name)


# --------------------------------------------------------------------------
# Convenience constructors


def _build(cell, kind, num_layers, bidirectional_, dropout, time_major, reverse,
           unroll, return_sequences, return_carry, merge):
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"{kind}: num_layers must be a positive int, got {num_layers!r}")
    if bidirectional_ and reverse:
        raise ValueError(f"{kind}: reverse=True has no meaning with bidirectional=True")
    if dropout and num_layers == 1:
        raise ValueError(f"{kind}: dropout acts between stacked layers and needs num_layers > 1; for "
                         f"dropout on a single layer's outputs, follow it with nn.dropout({dropout})")
    if merge == "tuple" and num_layers > 1:
        raise ValueError(f"{kind}: merge='tuple' cannot feed a next layer; use 'concat', 'add', ...")
    if num_layers == 1 and not bidirectional_:
        return rnn(cell, time_major=time_major, reverse=reverse, unroll=unroll,
                   return_sequences=return_sequences, return_carry=return_carry, name=kind)

    # Sub-layers always return (ys, carry); the flags select from that below,
    # without guessing what a layer returned.
    def one():
        layer = rnn(cell, time_major=time_major, reverse=reverse, unroll=unroll,
                    return_sequences=True, return_carry=True, name=kind)
        if bidirectional_:
            layer = bidirectional(layer, merge=merge, time_major=time_major, name="bi" + kind)
        return layer

    inner = one() if num_layers == 1 else stacked(
        *[one() for _ in range(num_layers)], dropout=dropout, name=kind)

    def select(ys, carries, merge_fn):
        if return_sequences:
            return (ys, carries) if return_carry else ys
        if return_carry:
            return carries
        last = carries if num_layers == 1 else carries[-1]
        if bidirectional_:
            return merge_fn(cell.output(last[0]), cell.output(last[1]))
        return cell.output(last)

    def init(key, input_shape):
        params, state, (ys, carries) = inner.init(key, input_shape)
        return params, state, select(ys, carries, lambda a, b: _merge_shape(a, b, merge))

    def apply(params, state, x, *, key=None, train=False):
        (ys, carries), new_state = inner.apply(params, state, x, key=key, train=train)
        return select(ys, carries, lambda a, b: _merge(a, b, merge)), new_state

    return Layer(init, apply, inner.name)


def lstm(hidden: int, *, num_layers: int = 1, bidirectional: bool = False, dropout: float = 0.0,
         forget_bias: float = 1.0, time_major: bool = False, reverse: bool = False, unroll: int = 1,
         return_sequences: bool = True, return_carry: bool = False, merge: str = "concat") -> Layer:
    """An LSTM sequence layer: :func:`rnn` over :func:`lstm_cell` (see both for details).

    ``num_layers > 1`` stacks layers (params ``layer_0``, ``layer_1``, ...;
    ``dropout``, the drop probability, acts between layers when
    ``train=True`` and then needs a key).  ``bidirectional=True`` makes each
    layer a :func:`bidirectional` pair (params ``forward``/``backward``) whose
    outputs are merged with ``merge`` (``"concat"``: feature size ``2H``).
    ``forget_bias=0.0`` gives torch's exact default init (1.0 by default).

    ``apply`` returns, as in :func:`rnn`: ``ys`` (return_sequences), ``(ys,
    carry)`` (both), ``carry`` (return_carry only), or the last output.
    Here ``ys`` is the last layer's output sequence and ``carry`` is

    * one layer: ``(h, c)``, each ``(B, H)``;
    * bidirectional: ``((h_fwd, c_fwd), (h_bwd, c_bwd))``, the backward
      direction's carry being taken after it has processed step 0;
    * ``num_layers = L``: a tuple of ``L`` such per-layer carries (torch's
      ``h_n[l * D + d]`` is ``carry[l][d][0]``).

    The last output is the last layer's ``h`` (bidirectional: ``merge(h_fwd,
    h_bwd)``), i.e. after each sequence's last valid step.

    Examples:
        >>> layer = nn.lstm(32)
        >>> params, state, out_shape = layer.init(jax.random.key(0), (1, 20, 8))
        >>> jax.tree.map(jnp.shape, params), out_shape
        ({'b': (128,), 'w': (40, 128)}, (1, 20, 32))
        >>> deep = nn.lstm(32, num_layers=2, bidirectional=True, dropout=0.1)
        >>> params, _, out_shape = deep.init(jax.random.key(0), (1, 20, 8))
        >>> sorted(params), sorted(params["layer_0"]), out_shape
        (['layer_0', 'layer_1'], ['backward', 'forward'], (1, 20, 64))
    """
    _check_hidden("lstm", hidden)
    return _build(lstm_cell(hidden, forget_bias=forget_bias), "lstm", num_layers,
                  bidirectional, dropout, time_major, reverse, unroll, return_sequences,
                  return_carry, merge)


def gru(hidden: int, *, num_layers: int = 1, bidirectional: bool = False, dropout: float = 0.0,
        time_major: bool = False, reverse: bool = False, unroll: int = 1,
        return_sequences: bool = True, return_carry: bool = False, merge: str = "concat") -> Layer:
    """A GRU sequence layer: :func:`rnn` over :func:`gru_cell`; options and outputs as
    :func:`lstm`, except that a GRU's carry is ``h`` alone (``(B, H)``), so a
    bidirectional carry is ``(h_fwd, h_bwd)`` and torch's ``h_n[l * D + d]``
    is ``carry[l][d]``.

    Examples:
        >>> layer = nn.gru(16, return_sequences=False)         # (B, T, F) -> (B, 16)
        >>> params, state, out_shape = layer.init(jax.random.key(0), (1, 20, 8))
        >>> jax.tree.map(jnp.shape, params), out_shape
        ({'b_hh': (48,), 'b_ih': (48,), 'w_hh': (16, 48), 'w_ih': (8, 48)}, (1, 16))
    """
    _check_hidden("gru", hidden)
    return _build(gru_cell(hidden), "gru", num_layers, bidirectional, dropout,
                  time_major, reverse, unroll, return_sequences, return_carry, merge)
