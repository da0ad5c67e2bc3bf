"""Dense and embedding layers, and the reshaping layers around them."""

import math

import jax
import jax.numpy as jnp

from fundl.nn import init as initializers
from fundl.nn.core import Layer, ShapeError, check_last_dim, get_param


def matmul(x, w):
    """``x @ w`` over the last axis of ``x`` (any leading axes), computed as one 2-D product.

    The leading axes are merged first: XLA:CPU runs the backward pass of an N-D by 2-D
    ``dot`` several times slower than that of the 2-D one (docs/benchmarks.md, "2-D products").
    """
    y = jnp.reshape(x, (-1, x.shape[-1])) @ w
    return jnp.reshape(y, (*x.shape[:-1], w.shape[-1]))


def dense(features: int, *, use_bias: bool = True, w_init=None, b_init=None,
          dtype=jnp.float32) -> Layer:
    """``y = x @ w + b`` over the last axis; any number of leading axes.

    Params: ``w`` of shape (in, features), ``b`` of shape (features,).
    Default init: LeCun normal weights, zero bias.

    Examples:
        >>> layer = nn.dense(3)
        >>> params, state, out_shape = layer.init(jax.random.key(0), (1, 5, 4))
        >>> jax.tree.map(jnp.shape, params), out_shape
        ({'b': (3,), 'w': (4, 3)}, (1, 5, 3))
    """
    if not isinstance(features, int) or features <= 0:
        raise ValueError(f"dense: features must be a positive int, got {features!r}")
    w_init = w_init or initializers.lecun_normal()
    b_init = b_init or initializers.zeros

    def init(key, input_shape):
        if len(input_shape) < 1:
            raise ShapeError(f"dense needs an input of rank >= 1, got shape {tuple(input_shape)}")
        k_w, k_b = jax.random.split(key)
        params = {"w": w_init(k_w, (input_shape[-1], features), dtype)}
        if use_bias:
            params["b"] = b_init(k_b, (features,), dtype)
        return params, {}, tuple(input_shape[:-1]) + (features,)

    def apply(params, state, x, *, key=None, train=False):
        w = get_param(params, "w")
        check_last_dim(x, w.shape[0])
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            raise ShapeError(
                f"dense expects a floating-point input, got dtype {jnp.result_type(x)}; "
                "cast it first (x.astype(jnp.float32)), or use nn.embedding for integer ids")
        y = x @ w.astype(x.dtype)
        if use_bias:
            y = y + get_param(params, "b").astype(x.dtype)
        return y, {}

    return Layer(init, apply, "dense")


def embedding(num_embeddings: int, features: int, *, w_init=None, dtype=jnp.float32) -> Layer:
    """Look up rows of a table ``w`` (num_embeddings, features) by integer ids.

    Ids of any shape ``(B, ...)`` give ``(B, ..., features)``.  Ids are not
    checked under ``jit``: following ``jnp.take``, an id ``>= num_embeddings``
    gives a row of NaN and a negative id counts from the end, so validate ids
    on the host if they may be out of range.

    Examples:
        >>> layer = nn.embedding(100, 8)
        >>> params, state, out_shape = layer.init(jax.random.key(0), (2, 5))
        >>> params["w"].shape, out_shape
        ((100, 8), (2, 5, 8))
    """
    w_init = w_init or initializers.normal(1.0)

    def init(key, input_shape):
        return {"w": w_init(key, (num_embeddings, features), dtype)}, {}, tuple(input_shape) + (features,)

    def apply(params, state, x, *, key=None, train=False):
        if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
            raise ShapeError(f"embedding expects integer ids, got dtype {jnp.asarray(x).dtype}")
        return jnp.take(get_param(params, "w"), x, axis=0), {}

    return Layer(init, apply, "embedding")


def flatten() -> Layer:
    """Flatten all axes after the batch axis: (B, ...) -> (B, prod(...)).

    Examples:
        >>> nn.flatten().init(jax.random.key(0), (1, 28, 28, 1))[2]
        (1, 784)
    """

    def check(shape):
        if len(shape) < 2:
            raise ShapeError(
                f"flatten expects an input of shape (batch, ...) with rank >= 2, got shape {tuple(shape)}; "
                "a single example needs a batch axis: x[None]")

    def init(key, input_shape):
        check(input_shape)
        return {}, {}, (input_shape[0], math.prod(input_shape[1:]))

    def apply(params, state, x, *, key=None, train=False):
        check(jnp.shape(x))
        return x.reshape(x.shape[0], -1), {}

    return Layer(init, apply, "flatten")


def reshape(shape) -> Layer:
    """Reshape the per-example axes to ``shape`` (the batch axis is kept; ``-1`` allowed).

    Examples:
        >>> nn.reshape((4, 4, 1)).init(jax.random.key(0), (2, 16))[2]
        (2, 4, 4, 1)
    """
    shape = tuple(shape)

    def out_shape(input_shape):
        size = math.prod(input_shape[1:])
        try:
            return (input_shape[0],) + jax.eval_shape(
                lambda: jnp.zeros(size).reshape(shape)).shape
        except (TypeError, ValueError):
            raise ShapeError(
                f"cannot reshape per-example shape {tuple(input_shape[1:])} (size {size}) to {shape}"
            ) from None

    def init(key, input_shape):
        return {}, {}, out_shape(tuple(input_shape))

    def apply(params, state, x, *, key=None, train=False):
        return x.reshape((x.shape[0],) + out_shape(x.shape)[1:]), {}

    return Layer(init, apply, "reshape")
