"""Multi-head attention: self- and cross-attention, masks, grouped-query heads, a KV cache.

The scores and weighted sums are ``jax.nn.dot_product_attention``'s, so a GPU
gets its fused kernel; on CPU the same values are computed as 3-D batched
products (:mod:`fundl.nn.attention_lowering`, faster there).  Dropout on the
attention weights (training with ``dropout > 0``) takes that explicit path on
every platform, since ``jax.nn`` has none.

Inputs: ``x`` (B, T, C) for self-attention, or a dict
``{"x": x, "context": c, "mask": m, "lengths": n}`` (every key but ``x``
optional): ``context`` (B, S, Cc) makes it cross-attention (keys and values
from ``c``); ``mask`` is boolean, True where a query may attend to a key,
of shape (T, S), (B, T, S) or (B, heads, T, S); ``lengths`` (B,) are the
valid key lengths (padding after them is ignored).  The output is (B, T, F).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fundl.nn import init as initializers
from fundl.nn.attention_lowering import attend, batched_attention
from fundl.nn.core import KeyMissingError, Layer, ShapeError, format_shape, get_param
from fundl.nn.decoding import Decoder
from fundl.nn.linear import matmul
from fundl.nn.positional import apply_rotary

__all__ = ["multi_head_attention", "dot_product_attention"]

_INPUT_KEYS = ("x", "context", "mask", "lengths")


def _split(x):
    """(x, context, mask, lengths) from an array or a dict input."""
    if isinstance(x, dict):
        extra = sorted(set(x) - set(_INPUT_KEYS))
        if "x" not in x or extra:
            raise ShapeError(f"an attention input dict needs key 'x' and may have {list(_INPUT_KEYS[1:])}; "
                             f"got keys {sorted(x)}")
        return x["x"], x.get("context"), x.get("mask"), x.get("lengths")
    return x, None, None, None


def _mask4(mask, batch: int, heads: int, t: int, s: int):
    """A boolean mask of shape (T, S), (B, T, S) or (B, N, T, S) as 4-D (broadcastable)."""
    m = jnp.asarray(mask)
    if m.dtype != jnp.bool_:
        raise ShapeError(f"expected a boolean attention mask (True: attend), got dtype {m.dtype}")
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    ok = m.ndim == 4 and m.shape[2:] == (t, s) and m.shape[0] in (1, batch) and m.shape[1] in (1, heads)
    if not ok:
        raise ShapeError(f"expected a mask of shape ({t}, {s}), ({batch}, {t}, {s}) or ({batch}, {heads}, {t}, {s}), "
                         f"got shape {format_shape(jnp.shape(mask))}")
    return m


def dot_product_attention(q, k, v, *, mask=None, causal=False, lengths=None, dropout=0.0, key=None,
                          implementation=None):
    """Softmax attention over heads: ``q`` (B, T, N, D), ``k`` and ``v`` (B, S, K, D) with
    ``N`` a multiple of ``K`` (grouped-query; ``K = 1``: multi-query); returns (B, T, N, D).

    ``mask`` (4-D boolean, broadcastable to (B, N, T, S)), ``causal`` and
    ``lengths`` (valid key lengths) combine.  Without dropout this is
    ``jax.nn.dot_product_attention`` (on CPU computed as 3-D batched products,
    ``fundl.nn.attention_lowering.attend``); with ``dropout > 0`` (then ``key``
    is needed) the weights are computed explicitly and dropped.
    """
    if not dropout:
        return attend(q, k, v, mask=mask, causal=causal, lengths=lengths, implementation=implementation)
    return batched_attention(q, k, v, mask=mask, causal=causal, lengths=lengths, dropout=dropout, key=key)


def multi_head_attention(num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
                         features: int | None = None, use_bias: bool = True, causal: bool = False,
                         dropout: float = 0.0, rope: bool = False, rope_base: float = 10000.0,
                         w_init=None, out_init=None, implementation=None, dtype=jnp.float32) -> Layer:
    """Multi-head attention (module docstring for the input forms): project, attend, project back.

    ``num_heads`` query heads of ``head_dim`` (default ``C // num_heads``);
    ``num_kv_heads`` key/value heads (default ``num_heads``; fewer: grouped-query,
    1: multi-query); ``features`` output width (default ``C``); ``causal``: each
    query attends to itself and earlier keys only; ``dropout``: drop probability
    of the attention weights in training; ``rope``: rotary embeddings on queries
    and keys (self-attention only).  ``w_init`` initialises the input projections
    and ``out_init`` the output one (LeCun normal by default); biases are zero.

    Params, self-attention: ``qkv`` (``w`` (C, (N + 2K) D): the queries' N heads,
    then the keys', then the values'; ``b``) and ``out`` (``w`` (N D, F), ``b``);
    cross-attention: ``query`` (C, N D), ``kv`` (Cc, 2 K D: keys, then values) and ``out``.
    Its decoder (self-attention) keeps keys and values in a fixed-size cache
    (:mod:`fundl.nn.decoding`).

    Examples:
        >>> attn = nn.multi_head_attention(4, num_kv_heads=2, causal=True)
        >>> params, _, out_shape = attn.init(jax.random.key(0), (2, 10, 32))
        >>> jax.tree.map(jnp.shape, params)["qkv"]["w"], out_shape      # 4 query heads, 2 key/value heads of 8
        ((32, 64), (2, 10, 32))
    """
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"multi_head_attention: num_heads must be a positive int, got {num_heads!r}")
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if not isinstance(kv_heads, int) or kv_heads <= 0 or num_heads % kv_heads:
        raise ValueError(f"multi_head_attention: num_kv_heads must divide num_heads={num_heads}, got {num_kv_heads!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"multi_head_attention: dropout is a drop probability in [0, 1), got {dropout}")
    w_init = w_init or initializers.lecun_normal()
    out_init = out_init or w_init
    name = "multi_head_attention"

    def dims(c):
        d = head_dim or c // num_heads
        if head_dim is None and c % num_heads:
            raise ShapeError(f"{name}: {num_heads} heads do not divide the input width {c}; pass head_dim")
        return d

    def proj(key, fan_in, fan_out, init_fn):
        k_w, k_b = jax.random.split(key)
        p = {"w": init_fn(k_w, (fan_in, fan_out), dtype)}
        if use_bias:
            p["b"] = jnp.zeros((fan_out,), dtype)
        return p

    def init(key, input_shape):
        if isinstance(input_shape, dict):
            x_shape, c_shape = tuple(get_param(input_shape, "x", "input shape")), input_shape.get("context")
        else:
            x_shape, c_shape = tuple(input_shape), None
        if len(x_shape) != 3 or (c_shape is not None and (len(c_shape) != 3 or c_shape[0] != x_shape[0])):
            raise ShapeError(f"{name} expected x of shape (batch, time, features) and a context of shape "
                             f"(batch, source time, features), got {format_shape(x_shape)} and "
                             f"{format_shape(c_shape) if c_shape is not None else None}")
        c = x_shape[-1]
        d = dims(c)
        f = features or c
        k_in, k_kv, k_out = jax.random.split(key, 3)
        if c_shape is None:
            params = {"qkv": proj(k_in, c, (num_heads + 2 * kv_heads) * d, w_init)}
        else:
            params = {"query": proj(k_in, c, num_heads * d, w_init), "kv": proj(k_kv, c_shape[-1], 2 * kv_heads * d, w_init)}
        params["out"] = proj(k_out, num_heads * d, f, out_init)
        return params, {}, x_shape[:2] + (f,)

    def linear(p, x):
        w = get_param(p, "w")
        if x.shape[-1] != w.shape[0]:
            raise ShapeError(f"{name} expected input of shape (..., {w.shape[0]}), got shape {format_shape(x.shape)}")
        y = matmul(x, w.astype(x.dtype))
        return y + get_param(p, "b").astype(x.dtype) if use_bias else y

    def head_size(params):
        return get_param(params, "out")["w"].shape[0] // num_heads

    def project_self(params, x, positions):
        """q (B, T, N, D), k and v (B, T, K, D) of ``x``, rotated at ``positions`` if ``rope``."""
        d = head_size(params)
        qkv = linear(get_param(params, "qkv"), x)
        q, k, v = jnp.split(qkv, [num_heads * d, (num_heads + kv_heads) * d], axis=-1)
        b, t = x.shape[:2]
        q, k, v = q.reshape(b, t, num_heads, d), k.reshape(b, t, kv_heads, d), v.reshape(b, t, kv_heads, d)
        if rope:
            q, k = apply_rotary(q, positions, base=rope_base), apply_rotary(k, positions, base=rope_base)
        return q, k, v

    def apply(params, state, x, *, key=None, train=False):
        x, context, mask, lengths = _split(x)
        if jnp.ndim(x) != 3:
            raise ShapeError(f"{name} expected x of shape (batch, time, features), got shape {format_shape(jnp.shape(x))}")
        b, t = x.shape[:2]
        if context is None:
            q, k, v = project_self(params, x, jnp.arange(t))
        else:
            if rope:
                raise ShapeError(f"{name}: rope=True is for self-attention; got a context (cross-attention)")
            d = head_size(params)
            q = linear(get_param(params, "query"), x).reshape(b, t, num_heads, d)
            kv = linear(get_param(params, "kv"), context.astype(x.dtype))
            k, v = (a.reshape(b, context.shape[1], kv_heads, d) for a in jnp.split(kv, 2, axis=-1))
        s = k.shape[1]
        m = None if mask is None else _mask4(mask, b, num_heads, t, s)
        drop = dropout if train else 0.0
        if drop and key is None:
            raise KeyMissingError(f"{name} with dropout in training mode needs a PRNG key: call "
                                  "apply(params, state, x, key=jax.random.key(...), train=True), or pass train=False")
        y = dot_product_attention(q, k, v, mask=m, causal=causal, dropout=drop, key=key,
                                  lengths=None if lengths is None else jnp.asarray(lengths, jnp.int32),
                                  implementation=implementation)
        return linear(get_param(params, "out"), y.reshape(b, t, -1)), {}

    def init_cache(params, batch_size, max_len, dtype_=jnp.float32):
        shape = (batch_size, max_len, kv_heads, head_size(params))
        return {"k": jnp.zeros(shape, dtype_), "v": jnp.zeros(shape, dtype_)}

    def step(params, cache, x, position):
        """Write the keys and values of ``x`` (positions ``position ..``) into the cache in
        place, then attend over the cache, masking the positions after each query's."""
        b, t = x.shape[:2]
        positions = position + jnp.arange(t)
        q, k, v = project_self(params, x, positions)
        ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), position, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), position, axis=1)
        visible = jnp.arange(ck.shape[1])[None, :] <= (positions[:, None] if causal else position + t - 1)
        y = attend(q, ck.astype(q.dtype), cv.astype(q.dtype), mask=visible[None, None], implementation=implementation)
        return linear(get_param(params, "out"), y.reshape(b, t, -1)), {"k": ck, "v": cv}

    return Layer(init, apply, name, decoder=Decoder(init_cache, step))
