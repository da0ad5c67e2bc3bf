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
