"""Position information for sequences (B, T, ...): learned position embeddings and rotary embeddings.

``learned_positions(max_len)`` adds a learned row per position (GPT-2's ``wpe``);
``rotary()`` rotates pairs of features by a position-dependent angle (RoPE,
Su et al. 2021), the form :func:`fundl.nn.multi_head_attention` applies to its
queries and keys with ``rope=True``.  Both have a decoder: a step at
``position`` uses the rows or angles of positions ``position ..``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fundl.nn import init as initializers
from fundl.nn.core import Layer, ShapeError, format_shape, get_param
from fundl.nn.decoding import Decoder

__all__ = ["learned_positions", "rotary", "apply_rotary"]


def learned_positions(max_len: int, *, w_init=None, dtype=jnp.float32) -> Layer:
    """``x + w[:T]`` for ``x`` of shape (B, T, C): one learned vector per position.

    Params: ``w`` of shape (max_len, C), normal with std 0.02 by default (GPT-2's).
    A sequence longer than ``max_len`` is an error.

    Examples:
        >>> layer = nn.learned_positions(16)
        >>> params, _, out_shape = layer.init(jax.random.key(0), (2, 10, 8))
        >>> params["w"].shape, out_shape
        ((16, 8), (2, 10, 8))
    """
    if not isinstance(max_len, int) or max_len <= 0:
        raise ValueError(f"learned_positions: max_len must be a positive int, got {max_len!r}")
    w_init = w_init or initializers.normal(0.02)

    def check(shape):
        if len(shape) != 3 or shape[1] > max_len:
            raise ShapeError(f"learned_positions({max_len}) expected input of shape (batch, <= {max_len}, "
                             f"features), got shape {format_shape(shape)}")

    def init(key, input_shape):
        check(tuple(input_shape))
        return {"w": w_init(key, (max_len, input_shape[-1]), dtype)}, {}, tuple(input_shape)

    def apply(params, state, x, *, key=None, train=False):
        check(jnp.shape(x))
        w = get_param(params, "w")
        return x + w[: x.shape[1]].astype(x.dtype), {}

    def step(params, cache, x, position):
        w = get_param(params, "w")
        rows = jax.lax.dynamic_slice_in_dim(w, position, x.shape[1], axis=0)
        return x + rows.astype(x.dtype), cache

    decoder = Decoder(lambda params, batch, length, dtype: {}, step, max_len)
    return Layer(init, apply, "learned_positions", decoder=decoder)


def _angles(positions, dim: int, base: float):
    """(T, dim // 2) angles ``position * base ** (-2i / dim)``, in float32."""
    inv = base ** (-jnp.arange(0, dim // 2, dtype=jnp.float32) * 2.0 / dim)
    return jnp.asarray(positions, jnp.float32)[:, None] * inv[None, :]


def apply_rotary(x, positions, *, base: float = 10000.0):
    """Rotate ``x`` (B, T, ..., D) at ``positions`` (T,): the first and second halves of the
    last axis are the two coordinates of D/2 pairs (the "rotate half" layout of GPT-NeoX
    and Llama), pair ``i`` turned by ``position * base ** (-2i / D)``."""
    d = x.shape[-1]
    if d % 2:
        raise ShapeError(f"rotary embeddings need an even feature size, got {d} in shape {format_shape(x.shape)}")
    ang = _angles(positions, d, base).reshape((x.shape[1],) + (1,) * (x.ndim - 3) + (d // 2,))
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x1, x2 = jnp.split(x.astype(jnp.promote_types(x.dtype, jnp.float32)), 2, axis=-1)
    y = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return y.astype(x.dtype)


def rotary(*, base: float = 10000.0) -> Layer:
    """Rotary position embeddings (RoPE) on ``x`` of shape (B, T, ..., D), position ``t`` along axis 1.

    No params.  The dot product of two rotated vectors depends only on their
    positions' difference, which is what attention needs (:func:`apply_rotary`).

    Examples:
        >>> layer = nn.rotary()
        >>> y, _ = layer.apply({}, {}, jnp.ones((1, 3, 2, 4)))      # (B, T, heads, head_dim)
        >>> y.shape, bool(jnp.allclose(y[:, 0], 1.0))                # position 0 is not turned
        ((1, 3, 2, 4), True)
    """

    def check(shape):
        if len(shape) < 3 or shape[-1] % 2:
            raise ShapeError(f"rotary expected input of shape (batch, time, ..., even features), "
                             f"got shape {format_shape(shape)}")

    def init(key, input_shape):
        check(tuple(input_shape))
        return {}, {}, tuple(input_shape)

    def apply(params, state, x, *, key=None, train=False):
        check(jnp.shape(x))
        return apply_rotary(x, jnp.arange(x.shape[1]), base=base), {}

    def step(params, cache, x, position):
        return apply_rotary(x, position + jnp.arange(x.shape[1]), base=base), cache

    return Layer(init, apply, "rotary", decoder=Decoder(lambda params, batch, length, dtype: {}, step))
