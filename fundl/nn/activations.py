"""Activation layers: parameter-free, shape-preserving :class:`Layer` values.

Each is a Layer itself (``nn.relu``), not a constructor, except the ones
that take a hyper-parameter (``nn.leaky_relu(0.1)``, ``nn.softmax(axis)``).
"""

import jax
import jax.numpy as jnp

from fundl.nn.core import elementwise

relu = elementwise(jax.nn.relu, "relu")
gelu = elementwise(jax.nn.gelu, "gelu")
silu = elementwise(jax.nn.silu, "silu")
swish = silu
tanh = elementwise(jnp.tanh, "tanh")
sigmoid = elementwise(jax.nn.sigmoid, "sigmoid")
softplus = elementwise(jax.nn.softplus, "softplus")
elu = elementwise(jax.nn.elu, "elu")
identity = elementwise(lambda x: x, "identity")


def leaky_relu(negative_slope: float = 0.01):
    return elementwise(lambda x: jax.nn.leaky_relu(x, negative_slope), "leaky_relu")


def softmax(axis: int = -1):
    return elementwise(lambda x: jax.nn.softmax(x, axis=axis), "softmax")


def log_softmax(axis: int = -1):
    return elementwise(lambda x: jax.nn.log_softmax(x, axis=axis), "log_softmax")
