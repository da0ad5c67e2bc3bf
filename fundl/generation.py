"""Sampling text from a language model with a cache: ``fundl.generate``.

One compiled program: a prefill (the prompt through the model's decoder at
position 0), then a ``lax.fori_loop`` that samples a token and steps the
decoder on it, one position at a time, with the cache as the loop carry (a
fixed-size KV cache updated in place, or a recurrent carry: the model's
:class:`~fundl.nn.decoding.Decoder` decides).  A model with a bounded context
(learned positions) that runs out of room continues as nanoGPT's
``generate`` does: each further token reads the last ``context`` tokens,
recomputed in one step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fundl.nn.core import Layer
from fundl.nn.decoding import Decoder, decoder_of

__all__ = ["generate", "GenerationError", "decode_loop"]


class GenerationError(ValueError):
    """Arguments ``generate`` cannot honour: a prompt that is not (B, T) ids, a negative count, ..."""


def _sample(logits, key, temperature, greedy: bool, top_k: int | None):
    """One id per row of ``logits`` (B, V): argmax when ``greedy``, else a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("decoder", "num_tokens", "greedy", "top_k"))
def decode_loop(decoder: Decoder, params, prompt, key, temperature, *, num_tokens: int, greedy: bool,
                top_k: int | None):
    """The one jitted program :func:`generate` runs (its arguments checked there): the prefill,
    then the loop; public so that its compiled form can be inspected (``decode_loop.lower(...)``)."""
    b, tp = prompt.shape
    total = tp + num_tokens
    max_len = decoder.max_len
    cache_len = total if max_len is None else min(total, max_len)
    start = 0 if max_len is None else max(0, tp - max_len)         # nanoGPT crops a long prompt
    dtype = next((leaf.dtype for leaf in jax.tree.leaves(params) if jnp.issubdtype(leaf.dtype, jnp.floating)),
                 jnp.float32)
    keys = jax.random.split(key, max(num_tokens, 1))
    out = jnp.zeros((b, total), jnp.int32).at[:, :tp].set(prompt.astype(jnp.int32))
    if num_tokens == 0:
        return out
    cache = decoder.init_cache(params, b, cache_len, dtype)
    logits, cache = decoder.step(params, cache, out[:, start:tp], 0)  # the prefill
    out = out.at[:, tp].set(_sample(logits[:, -1], keys[0], temperature, greedy, top_k))

    def put(out, j, logits):
        token = _sample(logits[:, -1], keys[j], temperature, greedy, top_k)
        return jax.lax.dynamic_update_slice_in_dim(out, token[:, None], tp + j, axis=1)

    def cached(j, carry):  # feed token tp + j - 1 at its cache position, sample token tp + j
        out, cache = carry
        previous = jax.lax.dynamic_slice_in_dim(out, tp + j - 1, 1, axis=1)
        logits, cache = decoder.step(params, cache, previous, tp + j - 1 - start)
        return put(out, j, logits), cache

    def windowed(j, out):  # the cache is full: the last max_len tokens, recomputed
        window = jax.lax.dynamic_slice_in_dim(out, tp + j - max_len, max_len, axis=1)
        logits, _ = decoder.step(params, decoder.init_cache(params, b, max_len, dtype), window, 0)
        return put(out, j, logits[:, -1:])

    cached_end = min(num_tokens, cache_len + start - tp + 1)
    out, _ = jax.lax.fori_loop(1, cached_end, cached, (out, cache))
    if cached_end < num_tokens:
        out = jax.lax.fori_loop(cached_end, num_tokens, windowed, out)
    return out


def generate(model: Layer | Decoder, params, prompt, num_tokens: int, *, key, temperature: float = 1.0,
             top_k: int | None = None):
    """The prompt (B, T_prompt) followed by ``num_tokens`` sampled ids: (B, T_prompt + num_tokens) int32.

    ``model``: a layer with a decoder (:func:`fundl.models.gpt`,
    :func:`fundl.models.char_lm`, or any :class:`~fundl.nn.Layer` whose
    ``decoder`` follows :mod:`fundl.nn.decoding`), or the decoder itself.
    ``temperature=0.0`` is greedy (argmax; ``key`` unused); otherwise each
    token is drawn from ``softmax(logits / temperature)``, restricted to the
    ``top_k`` most likely when given.  One prefill, then O(1) work per token
    beyond attending to the cache, in one compiled loop; compiled once per
    model, shapes, ``num_tokens``, ``top_k`` and greediness.

    Examples:
        >>> import fundl
        >>> model = models.gpt(11, context=16, layers=1, heads=2, width=8)
        >>> params, _, _ = model.init(jax.random.key(0), (1, 16))
        >>> out = fundl.generate(model, params, jnp.array([[1, 2, 3]]), 5, key=jax.random.key(1))
        >>> out.shape, out[:, :3].tolist()
        ((1, 8), [[1, 2, 3]])
    """
    decoder = model if isinstance(model, Decoder) else decoder_of(model)
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise GenerationError(f"generate: expected a prompt of integer ids of shape (batch, >= 1), got "
                              f"shape {tuple(prompt.shape)} and dtype {prompt.dtype}")
    if not isinstance(num_tokens, int) or num_tokens < 0:
        raise GenerationError(f"generate: expected num_tokens >= 0 (an int), got {num_tokens!r}")
    if not temperature >= 0.0:
        raise GenerationError(f"generate: expected temperature >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise GenerationError(f"generate: expected top_k None or an int >= 1, got {top_k!r}")
    greedy = temperature == 0.0
    return decode_loop(decoder, params, prompt, key, jnp.float32(1.0 if greedy else temperature),
                       num_tokens=num_tokens, greedy=greedy, top_k=top_k)
