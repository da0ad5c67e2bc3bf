"""Activation layers: parameter-free, shape-preserving :class:`Layer` values.

Each is a Layer itself (``nn.relu``), not a constructor, except the ones
that take a hyper-parameter (``nn.leaky_relu(0.1)``, ``nn.softmax(axis)``).

Examples:
    >>> model = nn.serial(nn.dense(8), nn.relu, nn.dense(2), nn.softmax())
    >>> nn.relu.apply({}, {}, jnp.array([-1.0, 2.0]))[0]
    Array([0., 2.], dtype=float32)
"""

import jax
import jax.numpy as jnp

from fundl.nn.core import elementwise

def _relu(x):
    # jax.nn.relu's values and gradient (0 at x = 0, NaN passed through), written as a select
    # with a scalar 0: XLA:CPU materialises the broadcast zeros of ``max(x, 0)`` as a full-size
    # array when it fuses the relu into a following pooling (the cost: docs/benchmarks.md, "CNN").
    return jnp.where(x <= 0, jnp.zeros((), x.dtype), x)


relu = elementwise(_relu, "relu")
"""``max(x, 0)`` elementwise (as ``jax.nn.relu``, gradient 0 at 0); a Layer: write ``nn.relu``,
not ``nn.relu()``."""
gelu = elementwise(jax.nn.gelu, "gelu")
"""GELU, ``x * Phi(x)`` (``jax.nn.gelu``, its tanh approximation); a Layer."""
silu = elementwise(jax.nn.silu, "silu")
"""SiLU (swish), ``x * sigmoid(x)`` (``jax.nn.silu``); a Layer."""
swish = silu
"""The same Layer as :data:`silu`."""
tanh = elementwise(jnp.tanh, "tanh")
"""``tanh(x)`` elementwise; a Layer."""
sigmoid = elementwise(jax.nn.sigmoid, "sigmoid")
"""``1 / (1 + exp(-x))`` elementwise; a Layer."""
softplus = elementwise(jax.nn.softplus, "softplus")
"""``log(1 + exp(x))`` elementwise; a Layer."""
elu = elementwise(jax.nn.elu, "elu")
"""ELU, ``x`` for ``x > 0`` else ``exp(x) - 1`` (``jax.nn.elu``); a Layer."""
identity = elementwise(lambda x: x, "identity")
"""The identity; a Layer (a placeholder where a layer is expected)."""


def leaky_relu(negative_slope: float = 0.01):
    """A Layer: ``x`` for ``x >= 0``, else ``negative_slope * x``.

    Examples:
        >>> nn.leaky_relu(0.1).apply({}, {}, jnp.array([-1.0, 2.0]))[0]
        Array([-0.1,  2. ], dtype=float32)
    """
    return elementwise(lambda x: jax.nn.leaky_relu(x, negative_slope), "leaky_relu")


def softmax(axis: int = -1):
    """A Layer: ``softmax`` over ``axis`` (probabilities summing to 1 along it).

    Examples:
        >>> nn.softmax().apply({}, {}, jnp.array([[0.0, 0.0]]))[0]
        Array([[0.5, 0.5]], dtype=float32)
    """
    return elementwise(lambda x: jax.nn.softmax(x, axis=axis), "softmax")


def log_softmax(axis: int = -1):
    """A Layer: ``log(softmax(x))`` over ``axis``, computed stably."""
    return elementwise(lambda x: jax.nn.log_softmax(x, axis=axis), "log_softmax")
