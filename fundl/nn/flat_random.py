"""Random draws made over a flat shape and reshaped: the same numbers, compiled far quicker.

``jax.random`` numbers the elements of a draw in row-major order, whatever the shape (and the
PRNG implementation), so ``uniform(key, (n,)).reshape(shape)`` equals ``uniform(key, shape)``
bit for bit.  XLA:CPU compiles the threefry hash of a rank-3 or rank-4 draw several times
slower than of a flat one (docs/benchmarks.md, "Random draws"), which every program with
dropout, DP-SGD noise or a convolution's initialiser paid.  fundl's layers draw through these.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _flat(draw, key, shape, *args, **kwargs):
    shape = tuple(int(d) for d in shape)
    return draw(key, *args, shape=(math.prod(shape),), **kwargs).reshape(shape)


def uniform(key, shape, dtype=jnp.float32, minval=0.0, maxval=1.0):
    """``jax.random.uniform(key, shape, dtype, minval, maxval)``, drawn flat."""
    return _flat(jax.random.uniform, key, shape, dtype=dtype, minval=minval, maxval=maxval)


def normal(key, shape, dtype=jnp.float32):
    """``jax.random.normal(key, shape, dtype)``, drawn flat."""
    return _flat(jax.random.normal, key, shape, dtype=dtype)


def truncated_normal(key, lower, upper, shape, dtype=jnp.float32):
    """``jax.random.truncated_normal(key, lower, upper, shape, dtype)``, drawn flat."""
    return _flat(jax.random.truncated_normal, key, shape, lower, upper, dtype=dtype)


def bernoulli(key, p, shape):
    """``jax.random.bernoulli(key, p, shape)``, drawn flat."""
    return _flat(jax.random.bernoulli, key, shape, p)
