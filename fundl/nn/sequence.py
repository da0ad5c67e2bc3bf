"""Sequence layers: a :class:`~fundl.nn.cells.Cell` scanned over time with ``jax.lax.scan``.

A **sequence layer** (:func:`rnn`, :func:`lstm`, :func:`gru`) is an ordinary
:class:`~fundl.nn.core.Layer` that scans a cell over the time axis, with
batch-major ``(B, T, F)`` or time-major ``(T, B, F)`` input, ``reverse``,
``unroll``, per-example sequence ``lengths`` (masking), and the choice of
returning all outputs and/or the final carry.  :func:`bidirectional` and
:func:`stacked` compose sequence layers; ``lstm(h, num_layers=2,
bidirectional=True, dropout=0.1)`` builds the PyTorch-style stack.

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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fundl.nn import flat_random
from fundl.nn.cells import Cell, check_hidden, gru_cell, lstm_cell
from fundl.nn.children import apply_child, check_children, init_child
from fundl.nn.core import KeyMissingError, Layer, ShapeError, format_shape, get_param

__all__ = ["rnn", "lstm", "gru", "bidirectional", "stacked", "reverse_sequences"]


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


def _select(return_sequences: bool, return_carry: bool, ys, carry, last):
    """What a sequence layer returns, by its two flags (the table in :func:`rnn`).

    ``last()`` gives the last output; it is called only when the flags ask for
    it.  The same for arrays (``apply``) and for shapes (``init``).
    """
    if return_sequences:
        return (ys, carry) if return_carry else ys
    return carry if return_carry else last()


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

    ``unroll`` is passed to ``lax.scan``; the default 1 was chosen by
    measurement on CPU (docs/benchmarks.md, "LSTM").

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
            raise ShapeError(f"{cell.name} expects an input shape {layout} of rank 3, got {format_shape(shape)}")
        params = cell.init(key, shape[2])
        B, T = shape[b_ax], shape[t_ax]
        carry = cell.carry_shape((B,))
        seq = (T, B, cell.hidden) if time_major else (B, T, cell.hidden)
        return params, {}, _select(return_sequences, return_carry, seq, carry, lambda: (B, cell.hidden))

    def apply(params, state, x, *, key=None, train=False):
        x, lengths, carry0 = _split_input(x)
        F = cell.input_size(params)
        layout = ("T", "B") if time_major else ("B", "T")
        if jnp.ndim(x) != 3 or jnp.shape(x)[-1] != F:
            raise ShapeError(
                f"expected input of shape ({layout[0]}, {layout[1]}, {F}) (rank 3), "
                f"got shape {format_shape(jnp.shape(x))} (rank {jnp.ndim(x)})")
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
        return _select(return_sequences, return_carry, ys, carry, lambda: cell.output(carry)), {}

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


def _join(y, carry, pair):
    """The inverse of :func:`_parts`: ``(y, carry)`` if ``pair``, else whichever is not None."""
    if pair:
        return y, carry
    return y if carry is None else carry


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
    """:func:`~fundl.nn.children.init_child`, for children without state (the only kind scanned here)."""
    p, s, out = init_child(layer, name, key, shape)
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
        return {"forward": p_f, "backward": p_b}, {}, _join(y, c, pair)

    def apply(params, state, x, *, key=None, train=False):
        xx, lengths, carry0 = _split_input(x)
        if carry0 is not None:
            raise ShapeError("bidirectional does not take an initial carry; pass x or (x, lengths)")
        if jnp.ndim(xx) != 3:
            raise ShapeError(f"expected input of rank 3, got shape {format_shape(jnp.shape(xx))} (rank {jnp.ndim(xx)})")
        if lengths is not None:
            _check_lengths(lengths, xx, time_major)
        check_children(params, ("forward", "backward"), "params")
        k_f, k_b = (None, None) if key is None else jax.random.split(key)
        x_rev = reverse_sequences(xx, lengths, time_major=time_major)
        fwd, _ = apply_child(forward_layer, "forward", params, {},
                              xx if lengths is None else (xx, lengths), k_f, train)
        bwd, _ = apply_child(backward_layer, "backward", params, {},
                              x_rev if lengths is None else (x_rev, lengths), k_b, train)
        y_f, c_f, pair = _parts(fwd, xx.ndim)
        y_b, c_b, _ = _parts(bwd, xx.ndim)
        y = None
        if y_f is not None:
            if y_b.ndim == xx.ndim:  # a sequence: realign in time
                y_b = reverse_sequences(y_b, lengths, time_major=time_major)
            y = _merge(y_f, y_b, merge)
        c = None if c_f is None else (c_f, c_b)
        return _join(y, c, pair), {}

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
        check_children(params, names, "params")
        rank = jnp.ndim(xx)
        carries, y = [], xx
        for k, (layer, nm) in enumerate(zip(layers, names)):
            if k > 0 and train and dropout > 0:
                keep = flat_random.bernoulli(jax.random.fold_in(key, 2 * k), 1.0 - dropout, y.shape)
                y = jnp.where(keep, y / (1.0 - dropout), jnp.zeros((), y.dtype))
            k_layer = None if key is None else jax.random.fold_in(key, 2 * k + 1)
            out, _ = apply_child(layer, nm, params, {}, y if lengths is None else (y, lengths), k_layer, train)
            y, c, pair = _parts(out, rank)
            if k < len(layers) - 1 and (y is None or y.ndim != rank):
                raise ShapeError(f"stacked: layer '{nm}' must return sequences of rank {rank}")
            if pair:
                carries.append(c)
        return ((y, tuple(carries)) if pair else out), {}

    return Layer(init, apply, name)


# --------------------------------------------------------------------------
# Convenience constructors


class _Options(NamedTuple):
    """The keyword arguments of :func:`lstm` and :func:`gru` beyond the cell's own."""

    num_layers: int
    bidirectional: bool
    dropout: float
    time_major: bool
    reverse: bool
    unroll: int
    return_sequences: bool
    return_carry: bool
    merge: str


def _build(cell: Cell, kind: str, opt: _Options) -> Layer:
    """The ``kind`` (``"lstm"``, ``"gru"``) layer of ``cell``: one :func:`rnn`, or a
    :func:`stacked` of ``opt.num_layers`` layers, each :func:`bidirectional` if asked."""
    if not isinstance(opt.num_layers, int) or opt.num_layers < 1:
        raise ValueError(f"{kind}: num_layers must be a positive int, got {opt.num_layers!r}")
    if opt.bidirectional and opt.reverse:
        raise ValueError(f"{kind}: reverse=True has no meaning with bidirectional=True")
    if opt.dropout and opt.num_layers == 1:
        raise ValueError(f"{kind}: dropout acts between stacked layers and needs num_layers > 1; for "
                         f"dropout on a single layer's outputs, follow it with nn.dropout({opt.dropout})")
    if opt.merge == "tuple" and opt.num_layers > 1:
        raise ValueError(f"{kind}: merge='tuple' cannot feed a next layer; use 'concat', 'add', ...")

    def scan(return_sequences, return_carry):
        return rnn(cell, time_major=opt.time_major, reverse=opt.reverse, unroll=opt.unroll,
                   return_sequences=return_sequences, return_carry=return_carry, name=kind)

    if opt.num_layers == 1 and not opt.bidirectional:
        return scan(opt.return_sequences, opt.return_carry)

    # Sub-layers always return (ys, carry); the flags select from that below,
    # without guessing what a layer returned.
    def one():
        layer = scan(True, True)
        if opt.bidirectional:
            layer = bidirectional(layer, merge=opt.merge, time_major=opt.time_major, name="bi" + kind)
        return layer

    inner = one() if opt.num_layers == 1 else stacked(
        *[one() for _ in range(opt.num_layers)], dropout=opt.dropout, name=kind)

    def select(ys, carries, merge_fn):
        def last():  # the last layer's output (both directions merged)
            carry = carries if opt.num_layers == 1 else carries[-1]
            if opt.bidirectional:
                return merge_fn(cell.output(carry[0]), cell.output(carry[1]))
            return cell.output(carry)

        return _select(opt.return_sequences, opt.return_carry, ys, carries, last)

    def init(key, input_shape):
        params, state, (ys, carries) = inner.init(key, input_shape)
        return params, state, select(ys, carries, lambda a, b: _merge_shape(a, b, opt.merge))

    def apply(params, state, x, *, key=None, train=False):
        (ys, carries), new_state = inner.apply(params, state, x, key=key, train=train)
        return select(ys, carries, lambda a, b: _merge(a, b, opt.merge)), new_state

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
    check_hidden("lstm", hidden)
    return _build(lstm_cell(hidden, forget_bias=forget_bias), "lstm", _Options(
        num_layers=num_layers, bidirectional=bidirectional, dropout=dropout, time_major=time_major,
        reverse=reverse, unroll=unroll, return_sequences=return_sequences, return_carry=return_carry,
        merge=merge))


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
    check_hidden("gru", hidden)
    return _build(gru_cell(hidden), "gru", _Options(
        num_layers=num_layers, bidirectional=bidirectional, dropout=dropout, time_major=time_major,
        reverse=reverse, unroll=unroll, return_sequences=return_sequences, return_carry=return_carry,
        merge=merge))
