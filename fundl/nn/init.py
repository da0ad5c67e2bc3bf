"""Parameter initialisers: ``init(key, shape, dtype) -> array``.

These are ``jax.nn.initializers`` plus the two families PyTorch uses, so that
models can be initialised the way their PyTorch counterparts are.
"""

import math

import jax
import jax.numpy as jnp
from jax.nn.initializers import (  # noqa: F401  (re-exported)
    constant,
    glorot_normal,
    glorot_uniform,
    he_normal,
    he_uniform,
    lecun_normal,
    lecun_uniform,
    normal,
    ones,
    orthogonal,
    truncated_normal,
    uniform,
    zeros,
)


def symmetric_uniform(bound: float):
    """U(-bound, bound): what ``torch.nn.LSTM``/``GRU`` use with bound 1/sqrt(hidden)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

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
