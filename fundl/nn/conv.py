"""Convolution and pooling layers, channels-last (NWC for 1D, NHWC for 2D).

Convolutions are ``jax.lax.conv_general_dilated`` with dimension numbers
NWC/WIO (1D) and NHWC/HWIO (2D); the weight ``w`` has shape
``(*kernel_size, in_channels // feature_group_count, features)``.  On CPU a
large convolution's weight gradient runs over the batch in chunks (``fundl.nn.conv_lowering``:
faster for large 2D layers on XLA:CPU, same results; figures in docs/benchmarks.md, "CNN").

``padding`` (convolutions and pooling alike) is one of

* ``"SAME"``: output size ``ceil(in / stride)``; the padding needed is split
  with the smaller half first (``lo = total // 2``), as in TensorFlow/JAX;
* ``"VALID"``: no padding; output size ``ceil((in - span + 1) / stride)``
  where ``span = (window - 1) * dilation + 1``;
* an ``int`` ``p``: ``p`` zeros on both sides of every spatial axis (PyTorch's
  ``padding=p``);
* a sequence with one entry per spatial axis, each an ``int`` (both sides) or
  a ``(lo, hi)`` pair, e.g. ``[(1, 2)]`` for conv1d or ``[(0, 1), (2, 2)]``.

Examples:
    >>> layer = nn.conv2d(16, 3, stride=2)
    >>> params, state, out_shape = layer.init(jax.random.key(0), (8, 28, 28, 1))
    >>> params["w"].shape, out_shape
    ((3, 3, 1, 16), (8, 14, 14, 16))
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fundl.nn import init as initializers
from fundl.nn.conv_lowering import convolve
from fundl.nn.core import Layer, ShapeError, check_input, format_shape, get_param


# --------------------------------------------------------------------------
# Argument normalisation (at construction time, so mistakes fail early).


def _tuple(value, nd: int, what: str, layer: str) -> tuple[int, ...]:
    """An int or a length-``nd`` sequence of positive ints, as a tuple."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * nd
    value = tuple(value)
    if len(value) != nd or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(
            f"{layer}: {what} must be a positive int or {nd} positive ints, got {value!r}"
        )
    return value


def _padding(padding, nd: int, layer: str):
    """``"SAME"``/``"VALID"`` or a tuple of ``nd`` explicit ``(lo, hi)`` pairs."""
    if isinstance(padding, str):
        p = padding.upper()
        if p not in ("SAME", "VALID"):
            raise ValueError(f"{layer}: padding must be 'SAME', 'VALID', an int or pairs, got {padding!r}")
        return p
    if isinstance(padding, int):
        padding = [padding] * nd
    try:
        pairs = [(e, e) if isinstance(e, int) else tuple(e) for e in padding]
    except TypeError:  # not iterable, or an entry that is neither int nor pair
        pairs = None
    if pairs is not None and not (
        len(pairs) == nd
        and all(len(p) == 2 and all(isinstance(v, int) and v >= 0 for v in p) for p in pairs)
    ):
        pairs = None
    if pairs is None:
        example = "[(1, 2)]" if nd == 1 else "[(1, 2), (0, 1)]"
        raise ValueError(
            f"{layer}: explicit padding needs one int or (lo, hi) pair of non-negative "
            f"ints per spatial axis ({nd} here), e.g. {example}; got {padding!r}"
        )
    return tuple(pairs)


def _pads(in_sizes, window, stride, dilation, padding):
    """The explicit (lo, hi) pairs a padding spec means for these input sizes."""
    if not isinstance(padding, str):
        return padding
    span = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
    if padding == "VALID":
        return tuple((0, 0) for _ in in_sizes)
    pads = []
    for n, s, w in zip(in_sizes, stride, span):
        out = -(-n // s)
        total = max((out - 1) * s + w - n, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


def _out_sizes(layer, in_sizes, window, stride, dilation, padding):
    """Spatial output sizes; a ShapeError when the window does not fit."""
    pads = _pads(in_sizes, window, stride, dilation, padding)
    out = []
    for n, k, s, d, (lo, hi) in zip(in_sizes, window, stride, dilation, pads):
        span = (k - 1) * d + 1
        if n + lo + hi < span:
            raise ShapeError(
                f"{layer}: a window spanning {span} does not fit a spatial size "
                f"{n} padded by ({lo}, {hi}); use a larger input, padding='SAME' "
                f"or a smaller kernel/dilation"
            )
        out.append((n + lo + hi - span) // s + 1)
    return tuple(out)


def _check_rank(x, nd: int, layer: str, channels=None):
    """Rank nd + 2 (batch, spatial..., channels) and, if known, the channel count."""
    layout = "(batch, width, channels)" if nd == 1 else "(batch, height, width, channels)"
    expected = (None,) * (nd + 1) + (channels,)
    if jnp.ndim(x) != nd + 2:
        raise ShapeError(
            f"{layer} expects an input of shape {format_shape(expected)} {layout} (rank {nd + 2}), "
            f"got shape {format_shape(jnp.shape(x))} (rank {jnp.ndim(x)}); add a batch axis "
            "with x[None] or a channel axis with x[..., None]"
        )
    if channels is not None:
        check_input(x, expected, what=f"{layer} input {layout}")


def _check_init_rank(input_shape, nd: int, layer: str) -> tuple:
    """``input_shape`` as a tuple, after checking it has rank nd + 2."""
    input_shape = tuple(input_shape)
    if len(input_shape) != nd + 2:
        raise ShapeError(
            f"{layer} expects an input shape of rank {nd + 2} (batch, spatial..., "
            f"channels), got {format_shape(input_shape)}"
        )
    return input_shape


# --------------------------------------------------------------------------
# Convolutions.

_DIMENSION_NUMBERS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}


def _conv(nd: int, features, kernel_size, stride, padding, dilation,
          feature_group_count, use_bias, w_init, b_init, dtype) -> Layer:
    name = f"conv{nd}d"
    if not isinstance(features, int) or features <= 0:
        raise ValueError(f"{name}: features must be a positive int, got {features!r}")
    kernel = _tuple(kernel_size, nd, "kernel_size", name)
    stride = _tuple(stride, nd, "stride", name)
    dilation = _tuple(dilation, nd, "dilation", name)
    padding = _padding(padding, nd, name)
    groups = feature_group_count
    if not isinstance(groups, int) or groups <= 0 or features % groups:
        raise ValueError(
            f"{name}: feature_group_count must be a positive int dividing "
            f"features={features}, got {groups!r}"
        )
    w_init = w_init or initializers.lecun_normal()  # fan_in = prod(kernel) * in/groups
    b_init = b_init or initializers.zeros
    dimension_numbers = _DIMENSION_NUMBERS[nd]

    def init(key, input_shape):
        input_shape = _check_init_rank(input_shape, nd, name)
        channels = input_shape[-1]
        if channels % groups:
            raise ShapeError(
                f"{name}: input channels {channels} are not divisible by "
                f"feature_group_count={groups}"
            )
        k_w, k_b = jax.random.split(key)
        params = {"w": w_init(k_w, kernel + (channels // groups, features), dtype)}
        if use_bias:
            params["b"] = b_init(k_b, (features,), dtype)
        spatial = _out_sizes(name, input_shape[1:-1], kernel, stride, dilation, padding)
        return params, {}, (input_shape[0],) + spatial + (features,)

    def apply(params, state, x, *, key=None, train=False):
        w = get_param(params, "w")
        _check_rank(x, nd, name, channels=w.shape[-2] * groups)
        y = convolve(
            x, w.astype(x.dtype),
            get_param(params, "b").astype(x.dtype) if use_bias else None,
            window_strides=stride,
            padding=padding,
            rhs_dilation=dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=groups,
        )
        return y, {}

    return Layer(init, apply, name)


def conv1d(features: int, kernel_size, stride=1, padding="SAME", dilation=1,
           feature_group_count: int = 1, *, use_bias: bool = True, w_init=None,
           b_init=None, dtype=jnp.float32) -> Layer:
    """1D convolution over (batch, width, channels) inputs.

    ``y[n, i, o] = b[o] + sum_{j, c} x_pad[n, i*stride + j*dilation, g*C_g + c] * w[j, c, o]``
    with ``g = o // (features / groups)`` and ``C_g = in_channels / groups``.

    Params: ``w`` (kernel, in/groups, features), ``b`` (features,).
    Default init: LeCun normal (fan_in = kernel * in/groups), zero bias.
    ``feature_group_count = in_channels`` with ``features = k * in_channels``
    is a depthwise convolution.  See the module docstring for ``padding``.

    Examples:
        >>> layer = nn.conv1d(16, 5, stride=2)                  # MNIST-1D: (batch, 40, 1)
        >>> params, state, out_shape = layer.init(jax.random.key(0), (1, 40, 1))
        >>> params["w"].shape, out_shape
        ((5, 1, 16), (1, 20, 16))
    """
    return _conv(1, features, kernel_size, stride, padding, dilation,
                 feature_group_count, use_bias, w_init, b_init, dtype)


def conv2d(features: int, kernel_size, stride=1, padding="SAME", dilation=1,
           feature_group_count: int = 1, *, use_bias: bool = True, w_init=None,
           b_init=None, dtype=jnp.float32) -> Layer:
    """2D convolution over (batch, height, width, channels) inputs.

    ``kernel_size``, ``stride`` and ``dilation`` are an int or an (h, w) pair.
    Params: ``w`` (kh, kw, in/groups, features), ``b`` (features,).
    Default init: LeCun normal (fan_in = kh * kw * in/groups), zero bias.
    To port PyTorch ``Conv2d`` weights (out, in/groups, kh, kw) use
    ``w = torch_w.transpose(2, 3, 1, 0)``.  See the module docstring for
    ``padding``.

    Examples:
        >>> nn.conv2d(32, 3).init(jax.random.key(0), (1, 28, 28, 1))[2]                   # SAME
        (1, 28, 28, 32)
        >>> nn.conv2d(32, (3, 3), padding="VALID").init(jax.random.key(0), (1, 28, 28, 1))[2]
        (1, 26, 26, 32)
    """
    return _conv(2, features, kernel_size, stride, padding, dilation,
                 feature_group_count, use_bias, w_init, b_init, dtype)


# --------------------------------------------------------------------------
# Pooling.


def _lowest(dtype):
    # A NumPy scalar, not a jnp array: under jit a jnp constant is a tracer, and
    # lax.reduce_window then falls back to its generic (non-differentiable) form.
    if jnp.issubdtype(dtype, jnp.floating):
        return np.array(-np.inf, dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        return np.array(jnp.iinfo(dtype).min, dtype)
    raise TypeError(f"max pooling needs a float or int input, got {dtype}")


def _tiles(x, window):
    """``x`` (batch, spatial..., channels) reshaped so each window is its own axes, and those axes."""
    split = (x.shape[0],)
    for n, w in zip(x.shape[1:-1], window):
        split += (n // w, w)
    return x.reshape(split + (x.shape[-1],)), tuple(range(2, 2 * len(window) + 1, 2))


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _tiled_max(x, window):
    """Max pooling whose windows tile the input exactly (stride = window, no padding), as a
    reshape and a max: on XLA:CPU, ``reduce_window`` and its ``select_and_scatter`` gradient
    were the slow part of a CNN step with max pooling (docs/benchmarks.md, *CNN*, has the
    per-step figures and the command that regenerates them)."""
    tiles, axes = _tiles(x, window)
    return jnp.max(tiles, axis=axes)


@_tiled_max.defjvp
def _tiled_max_jvp(window, primals, tangents):
    # The tangent of the first maximum in each window (row-major order), as reduce_window's
    # gradient and PyTorch's: ties (e.g. zeros after a relu) do not split the gradient.
    (x,), (t,) = primals, tangents
    tiles, axes = _tiles(x, window)
    out = jnp.max(tiles, axis=axes)
    shape = [1] * tiles.ndim
    for axis, w in zip(axes, window):
        shape[axis] = w
    order = jnp.asarray(np.arange(math.prod(window), dtype=np.int32).reshape(shape))
    first = jnp.min(jnp.where(tiles == jnp.expand_dims(out, axes), order, order.size), axis=axes)
    chosen = order == jnp.expand_dims(first, axes)
    return out, jnp.sum(jnp.where(chosen, _tiles(t, window)[0], 0), axis=axes)


def _pool(nd: int, kind: str, window, stride, padding) -> Layer:
    name = f"{kind}_pool{nd}d"
    window = _tuple(window, nd, "window", name)
    stride = window if stride is None else _tuple(stride, nd, "stride", name)
    padding = _padding(padding, nd, name)
    dims = (1,) + window + (1,)
    strides = (1,) + stride + (1,)
    ones = (1,) * nd

    def init(key, input_shape):
        input_shape = _check_init_rank(input_shape, nd, name)
        spatial = _out_sizes(name, input_shape[1:-1], window, stride, ones, padding)
        return {}, {}, (input_shape[0],) + spatial + (input_shape[-1],)

    def apply(params, state, x, *, key=None, train=False):
        _check_rank(x, nd, name)
        pads = ((0, 0),) + _pads(x.shape[1:-1], window, stride, ones, padding) + ((0, 0),)
        tiled = (window == stride and all(lo == 0 and hi == 0 for lo, hi in pads)
                 and all(n % w == 0 for n, w in zip(x.shape[1:-1], window)))
        if kind == "max" and tiled and jnp.issubdtype(x.dtype, jnp.floating):
            return _tiled_max(x, window), {}
        if kind == "max":
            return lax.reduce_window(x, _lowest(x.dtype), lax.max, dims, strides, pads), {}
        total = lax.reduce_window(x, np.array(0, x.dtype), lax.add, dims, strides, pads)
        if all(lo == 0 and hi == 0 for lo, hi in pads):
            return total / math.prod(window), {}
        # Divide by the number of real (unpadded) elements in each window.
        count = lax.reduce_window(np.ones(x.shape[1:-1], x.dtype), np.array(0, x.dtype),
                                  lax.add, window, stride, pads[1:-1])
        return total / count[None, ..., None], {}

    return Layer(init, apply, name)


def max_pool1d(window, stride=None, padding="VALID") -> Layer:
    """Max over windows of (batch, width, channels); ``stride`` defaults to ``window``.

    Padded positions hold ``-inf`` (the dtype's minimum for ints), so they
    never win; with ``padding=p`` this equals PyTorch's ``MaxPool1d(padding=p)``.
    """
    return _pool(1, "max", window, stride, padding)


def max_pool2d(window, stride=None, padding="VALID") -> Layer:
    """Max over windows of (batch, height, width, channels); see :func:`max_pool1d`.

    Examples:
        >>> nn.max_pool2d(2).init(jax.random.key(0), (1, 28, 28, 32))[2]
        (1, 14, 14, 32)
    """
    return _pool(2, "max", window, stride, padding)


def avg_pool1d(window, stride=None, padding="VALID") -> Layer:
    """Mean over windows of (batch, width, channels); ``stride`` defaults to ``window``.

    With padding, each window is divided by the number of *real* elements it
    covers, not the window size: padding never dilutes the average (Flax's
    ``count_include_pad=False``, PyTorch's ``AvgPool1d(count_include_pad=False)``).

    Examples:
        >>> pool = nn.avg_pool1d(2)
        >>> pool.apply({}, {}, jnp.array([[[1.0], [3.0], [5.0], [7.0]]]))[0][..., 0]
        Array([[2., 6.]], dtype=float32)
    """
    return _pool(1, "avg", window, stride, padding)


def avg_pool2d(window, stride=None, padding="VALID") -> Layer:
    """Mean over windows of (batch, height, width, channels); see :func:`avg_pool1d`."""
    return _pool(2, "avg", window, stride, padding)


def _global_pool(kind: str, reduce, keepdims: bool) -> Layer:
    name = f"global_{kind}_pool"

    def init(key, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 3:
            raise ShapeError(
                f"{name} expects an input shape (batch, spatial..., channels) of rank "
                f">= 3, got {format_shape(input_shape)}"
            )
        spatial = (1,) * (len(input_shape) - 2) if keepdims else ()
        return {}, {}, (input_shape[0],) + spatial + (input_shape[-1],)

    def apply(params, state, x, *, key=None, train=False):
        if jnp.ndim(x) < 3:
            raise ShapeError(
                f"{name} expects an input (batch, spatial..., channels) of rank >= 3, "
                f"got shape {format_shape(jnp.shape(x))} (rank {jnp.ndim(x)})"
            )
        return reduce(x, axis=tuple(range(1, x.ndim - 1)), keepdims=keepdims), {}

    return Layer(init, apply, name)


def global_avg_pool(keepdims: bool = False) -> Layer:
    """Mean over all spatial axes: (batch, *spatial, C) -> (batch, C)
    (or (batch, 1, ..., 1, C) with ``keepdims=True``).

    Examples:
        >>> nn.global_avg_pool().init(jax.random.key(0), (1, 7, 7, 64))[2]
        (1, 64)
    """
    return _global_pool("avg", jnp.mean, keepdims)


def global_max_pool(keepdims: bool = False) -> Layer:
    """Max over all spatial axes: (batch, *spatial, C) -> (batch, C)."""
    return _global_pool("max", jnp.max, keepdims)
