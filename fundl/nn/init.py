"""Parameter initialisers: ``init(key, shape, dtype) -> array``.

These are ``jax.nn.initializers`` plus the two families PyTorch uses, so that
models can be initialised the way their PyTorch counterparts are.  The random
ones (``normal``, ``uniform``, ``truncated_normal`` and the variance-scaling
family: ``lecun_*``, ``glorot_*``, ``he_*``) return exactly what JAX's do, drawn
through ``fundl.nn.flat_random``, which compiles a convolution's kernel
several times quicker; complex dtypes go to JAX's own.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.nn import initializers as _jax
from jax.nn.initializers import constant, ones, orthogonal, zeros  # noqa: F401  (re-exported)

from fundl.nn import flat_random

# The standard deviation of a standard normal truncated to (-2, 2), as JAX's variance scaling divides by.
_TRUNCATED_STD = 0.87962566103423978


def _real(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def normal(stddev: float = 1e-2, dtype=None):
    """N(0, stddev^2): ``jax.nn.initializers.normal``'s values."""
    def init(key, shape, dtype=dtype):
        dtype = jnp.float32 if dtype is None else dtype
        if not _real(dtype):
            return _jax.normal(stddev)(key, shape, dtype)
        return flat_random.normal(key, shape, dtype) * jnp.array(stddev, dtype)
    return init


def uniform(scale: float = 1e-2, dtype=None):
    """U[0, scale): ``jax.nn.initializers.uniform``'s values."""
    def init(key, shape, dtype=dtype):
        dtype = jnp.float32 if dtype is None else dtype
        return flat_random.uniform(key, shape, dtype) * jnp.array(scale, dtype)
    return init


def truncated_normal(stddev: float = 1e-2, dtype=None, lower: float = -2.0, upper: float = 2.0):
    """N(0, stddev^2) truncated to (lower, upper) standard deviations:
    ``jax.nn.initializers.truncated_normal``'s values."""
    def init(key, shape, dtype=dtype):
        dtype = jnp.float32 if dtype is None else dtype
        if not _real(dtype):
            return _jax.truncated_normal(stddev, dtype, lower, upper)(key, shape, dtype)
        return flat_random.truncated_normal(key, lower, upper, shape, dtype) * jnp.array(stddev, dtype)
    return init


def _fans(shape, in_axis, out_axis, batch_axis) -> tuple[float, float]:
    """(fan_in, fan_out) as JAX counts them: the axes named, times the rest (a kernel's receptive field)."""
    if isinstance(in_axis, int) and in_axis == -2 and len(shape) <= 1:
        raise ValueError(f"Can't compute input and output sizes of a {len(shape)}-dimensional weights tensor "
                         f"with default in_axis. Must be at least 2D or specify in_axis explicitly.")
    size = lambda axes: shape[axes] if isinstance(axes, int) else math.prod(shape[i] for i in axes)  # noqa: E731
    in_size, out_size = size(in_axis), size(out_axis)
    receptive = math.prod(shape) / in_size / out_size / size(batch_axis)
    return in_size * receptive, out_size * receptive


def variance_scaling(scale: float, mode: str, distribution: str, in_axis: int | Sequence[int] = -2,
                     out_axis: int | Sequence[int] = -1, batch_axis: int | Sequence[int] = (), dtype=None):
    """``jax.nn.initializers.variance_scaling``: samples of variance ``scale / fan`` (``mode``:
    ``fan_in``, ``fan_out``, ``fan_avg`` or ``fan_geo_avg``), from ``distribution``
    (``truncated_normal``, ``normal`` or ``uniform``); the same values as JAX's."""
    fallback = _jax.variance_scaling(scale, mode, distribution, in_axis, out_axis, batch_axis, dtype)

    def init(key, shape, dtype=dtype):
        dtype = jnp.float32 if dtype is None else dtype
        shape = tuple(int(d) for d in shape)
        if not _real(dtype):
            return fallback(key, shape, dtype)
        fan_in, fan_out = _fans(shape, in_axis, out_axis, batch_axis)
        denominator = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2,
                       "fan_geo_avg": (fan_in * fan_out) ** 0.5}.get(mode)
        if denominator is None:
            raise ValueError(f"invalid mode for variance scaling initializer: {mode}")
        variance = jnp.array(scale / denominator, dtype=dtype)
        if distribution == "truncated_normal":
            stddev = jnp.sqrt(variance) / jnp.array(_TRUNCATED_STD, dtype)
            return flat_random.truncated_normal(key, -2, 2, shape, dtype) * stddev
        if distribution == "normal":
            return flat_random.normal(key, shape, dtype) * jnp.sqrt(variance)
        if distribution == "uniform":
            return flat_random.uniform(key, shape, dtype, -1) * jnp.sqrt(3 * variance)
        raise ValueError(f"invalid distribution for variance scaling initializer: {distribution}")

    return init


def _family(scale: float, mode: str, distribution: str, doc: str):
    def make(in_axis=-2, out_axis=-1, batch_axis=(), dtype=None):
        return variance_scaling(scale, mode, distribution, in_axis, out_axis, batch_axis, dtype)
    make.__doc__ = doc
    return make


lecun_normal = _family(1.0, "fan_in", "truncated_normal", "LeCun normal: truncated normal, variance 1/fan_in.")
lecun_uniform = _family(1.0, "fan_in", "uniform", "LeCun uniform: variance 1/fan_in.")
glorot_normal = _family(1.0, "fan_avg", "truncated_normal",
                        "Glorot (Xavier) normal: truncated normal, variance 2/(fan_in + fan_out).")
glorot_uniform = _family(1.0, "fan_avg", "uniform", "Glorot (Xavier) uniform: variance 2/(fan_in + fan_out).")
he_normal = _family(2.0, "fan_in", "truncated_normal", "He (Kaiming) normal: truncated normal, variance 2/fan_in.")
he_uniform = _family(2.0, "fan_in", "uniform", "He (Kaiming) uniform: variance 2/fan_in.")


def symmetric_uniform(bound: float):
    """U(-bound, bound): what ``torch.nn.LSTM``/``GRU`` use with bound 1/sqrt(hidden)."""

    def init(key, shape, dtype=jnp.float32):
        return flat_random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_fan_in_uniform(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Linear/Conv biases
    and, equivalently, for their weights (``kaiming_uniform_(a=sqrt(5))``)."""
    return symmetric_uniform(1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0)


def torch_default(layer):
    """``layer`` (``nn.dense``, ``nn.conv1d``/``conv2d``) initialised as PyTorch's
    ``nn.Linear``/``nn.ConvNd`` are by default: weight and bias both
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's ``kaiming_uniform_(a=sqrt(5))``
    is that bound), ``fan_in = prod(w.shape[:-1])`` (inputs x kernel / groups).

    A wrapper rather than a ``w_init``: the bias bound needs the fan-in, which
    only ``init`` knows (from the input shape).  It redraws ``w`` (and ``b``)
    after ``layer.init``; ``apply``, names and the params tree are ``layer``'s.
    Recurrent layers need no wrapper: ``nn.gru`` is torch's init already and
    ``nn.lstm(forget_bias=0.0)`` is.

    Examples:
        >>> layer = nn.init.torch_default(nn.dense(10))   # nn.Linear(25, 10)'s init
        >>> params, _, _ = layer.init(jax.random.key(0), (1, 25))
        >>> [bool(jnp.abs(params[k]).max() <= 1 / 5) for k in ("w", "b")]   # fan_in 25: bound 0.2
        [True, True]
    """
    from fundl.nn.core import Layer, ParamsError  # core does not import this module

    def init(key, input_shape):
        params, state, out = layer.init(key, input_shape)
        if not isinstance(params, dict) or "w" not in params:
            raise ParamsError(f"torch_default wraps layers with a weight 'w' (dense, conv), got {layer.name!r} "
                              f"with params {sorted(params) if isinstance(params, dict) else type(params).__name__}")
        w = params["w"]
        bound = torch_fan_in_uniform(math.prod(w.shape[:-1]))
        k_w, k_b = jax.random.split(jax.random.fold_in(key, 1))
        new = {**params, "w": bound(k_w, w.shape, w.dtype)}
        if "b" in params:
            new["b"] = bound(k_b, params["b"].shape, params["b"].dtype)
        return new, state, out

    return Layer(init, layer.apply, layer.name, layer.auto_name)
