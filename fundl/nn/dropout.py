"""Dropout: ``rate`` is the probability of *dropping* a unit."""

import jax.numpy as jnp

from fundl.nn import flat_random
from fundl.nn.core import KeyMissingError, Layer


def dropout(rate: float) -> Layer:
    """Zero each element with probability ``rate`` in training, scale the rest
    by ``1 / (1 - rate)``; the identity when ``train=False``.

    Training mode needs a PRNG ``key``; calling without one is an error
    (:class:`~fundl.nn.KeyMissingError`), not a silent no-op.  Any shape; no params.

    Examples:
        >>> drop = nn.dropout(0.5)
        >>> params, state, _ = drop.init(jax.random.key(0), (1, 4))
        >>> y, _ = drop.apply(params, state, jnp.ones((2, 4)), key=jax.random.key(1), train=True)
        >>> sorted(set(y.ravel().tolist()))          # dropped, or kept and scaled by 1 / (1 - 0.5)
        [0.0, 2.0]
        >>> drop.apply(params, state, jnp.ones((2, 4)))[0].sum()   # train=False: the identity
        Array(8., dtype=float32)
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate is the drop probability and must be in [0, 1), got {rate}")

    def init(key, input_shape):
        return {}, {}, tuple(input_shape)

    def apply(params, state, x, *, key=None, train=False):
        if not train or rate == 0.0:
            return x, {}
        if key is None:
            raise KeyMissingError(
                "dropout in training mode needs a PRNG key: call "
                "apply(params, state, x, key=jax.random.key(...), train=True), "
                "or pass train=False for evaluation"
            )
        keep = flat_random.bernoulli(key, 1.0 - rate, jnp.shape(x))
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)), {}

    return Layer(init, apply, "dropout")
