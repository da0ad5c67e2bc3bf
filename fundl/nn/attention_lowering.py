"""How fundl computes softmax attention: as 3-D batched products on CPU, ``jax.nn.dot_product_attention`` elsewhere.

XLA:CPU (jaxlib 0.10.2) runs the forward and backward passes of
``jax.nn.dot_product_attention`` (4-D ``einsum``s over (B, T, N, D), vmapped over
the query groups) slower than the same arithmetic written as products of 3-D
arrays with the heads merged into the batch: queries (B K, G T, D), keys and
values (B K, S, D), for K key/value heads of G query heads each (grouped-query
attention never copies the keys), with the softmax over rows of a 2-D array.
The masks (causal, boolean, key lengths) are applied as ``jax.nn`` applies them:
``where(allowed, logits, -0.7 * float32 max)``, then a float32 softmax, so the
two agree to rounding.  Measured by ``benchmarks/bench_gpt_step.py``; the figures
are in docs/benchmarks.md, "Attention on CPU".

``lax.platform_dependent`` picks the 3-D form only when the computation is
lowered for CPU: a GPU keeps ``jax.nn.dot_product_attention`` and whatever fused
kernel it selects.  Dropout on the attention weights (which ``jax.nn`` lacks)
uses the 3-D form on every platform.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from fundl.nn import flat_random

__all__ = ["attend", "batched_attention"]


def _large_negative():
    """The masked logits' value, ``jax.nn.dot_product_attention``'s: finite, so a query with no
    visible key averages all values uniformly instead of giving NaN."""
    return jnp.asarray(-0.7 * jnp.finfo(jnp.float32).max, jnp.float32)


def _allowed(mask, causal: bool, lengths, k: int, g: int, t: int, s: int):
    """The combined boolean mask, 5-D and broadcastable to (B, K, G, T, S); None if nothing is masked."""
    allowed = None

    def both(a, m):
        return m if a is None else a & m

    if mask is not None:  # (B or 1, N or 1, T, S)
        mb, mn = mask.shape[:2]
        mask = jnp.broadcast_to(mask, (mb, mn, t, s))
        allowed = both(allowed, mask.reshape(mb, k, g, t, s) if mn > 1 else mask[:, :, None])
    if causal:
        allowed = both(allowed, jnp.tril(jnp.ones((t, s), bool))[None, None, None])
    if lengths is not None:
        allowed = both(allowed, (jnp.arange(s)[None, :] < lengths[:, None])[:, None, None, None, :])
    return allowed


def batched_attention(q, k, v, *, mask=None, causal: bool = False, lengths=None, dropout: float = 0.0, key=None):
    """Softmax attention as 3-D batched products: ``q`` (B, T, N, D), ``k`` and ``v`` (B, S, K, D) with
    ``K`` dividing ``N``; ``mask`` boolean, 4-D and broadcastable to (B, N, T, S); ``lengths`` (B,) valid
    key lengths.  Returns (B, T, N, D), the values of ``jax.nn.dot_product_attention`` (scale
    ``1 / sqrt(D)``).  ``dropout > 0`` drops attention weights with a (B, N, T, S) mask drawn from ``key``."""
    b, t, n, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    q3 = q.reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4).reshape(b * kh, g * t, d)
    k3 = k.transpose(0, 2, 1, 3).reshape(b * kh, s, d)
    v3 = v.transpose(0, 2, 1, 3).reshape(b * kh, s, d)
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = lax.dot_general(q3, k3, (((2,), (2,)), ((0,), (0,))), preferred_element_type=logits_dtype)
    logits = (logits * jnp.asarray(1.0 / math.sqrt(d), logits_dtype)).astype(jnp.float32).reshape(b, kh, g, t, s)
    allowed = _allowed(mask, causal, lengths, kh, g, t, s)
    if allowed is not None:  # selected, not added: a query that sees no key then has no gradient, as in jax.nn
        logits = jnp.where(allowed, logits, _large_negative())
    probs = jax.nn.softmax(logits.reshape(-1, s), axis=-1).reshape(b, kh, g, t, s)  # rows: faster reductions
    if dropout:
        keep = flat_random.bernoulli(key, 1.0 - dropout, (b, n, t, s)).reshape(b, kh, g, t, s)
        probs = jnp.where(keep, probs / (1.0 - dropout), 0.0)
    probs = probs.astype(v.dtype).reshape(b * kh, g * t, s)
    y = lax.dot_general(probs, v3, (((2,), (1,)), ((0,), (0,))))  # (B K, G T, D)
    return y.reshape(b, kh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


def attend(q, k, v, *, mask=None, causal: bool = False, lengths=None, implementation=None):
    """``jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
    key_value_seq_lengths=lengths)``, lowered on CPU as :func:`batched_attention`.

    ``implementation``: ``None`` chooses by platform (above); ``"xla"`` or ``"cudnn"`` is passed to
    ``jax.nn.dot_product_attention`` on every platform.
    """
    def library(q_, k_, v_):
        return jax.nn.dot_product_attention(q_, k_, v_, mask=mask, is_causal=causal, key_value_seq_lengths=lengths,
                                            implementation=implementation)

    if implementation is not None:
        return library(q, k, v)
    return lax.platform_dependent(
        q, k, v, cpu=lambda a, b_, c: batched_attention(a, b_, c, mask=mask, causal=causal, lengths=lengths),
        default=library)
