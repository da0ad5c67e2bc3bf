"""The decoding contract: how a layer runs a sequence a few positions at a time, with a cache.

A layer that can generate carries a :class:`Decoder` in ``Layer.decoder``:

* ``init_cache(params, batch_size, max_len, dtype) -> cache``: an empty cache
  for sequences of up to ``max_len`` positions (a pytree of fixed shapes);
* ``step(params, cache, x, position) -> (y, cache)``: ``x`` holds positions
  ``position .. position + T - 1`` (``T = x.shape[1]``), the cache the ones
  before; ``y`` equals those positions of ``apply`` on the whole sequence
  (evaluation mode).  ``position`` may be a traced int.

One ``step`` serves the prefill (the whole prompt at position 0) and each new
token (``T = 1``): attention keeps its keys and values in a fixed-size cache
updated in place; a recurrent layer keeps its carry.  :func:`fundl.generation.generate`
asks nothing else of a model.  Layers without a decoder that act on each
position on its own (dense, norms, activations, dropout in evaluation) are
stepped by :func:`step_children` through their ``apply``.

Examples:
    >>> layer = nn.multi_head_attention(2, causal=True)
    >>> params, _, _ = layer.init(jax.random.key(0), (1, 6, 8))
    >>> x = jax.random.normal(jax.random.key(1), (1, 6, 8))
    >>> cache = layer.decoder.init_cache(params, 1, 6, jnp.float32)
    >>> y_head, cache = layer.decoder.step(params, cache, x[:, :4], 0)   # prefill 4 positions
    >>> y_last, cache = layer.decoder.step(params, cache, x[:, 4:5], 4)  # then one more
    >>> bool(jnp.allclose(y_last, layer.apply(params, {}, x)[0][:, 4:5], atol=1e-5))
    True
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

from fundl.nn.core import Layer, LayerError

__all__ = ["Decoder", "DecodingError", "decoder_of", "children_bound", "init_children_cache", "step_children"]


class Decoder(NamedTuple):
    """``init_cache(params, batch_size, max_len, dtype)`` and
    ``step(params, cache, x, position) -> (y, cache)`` (module docstring);
    ``max_len``: the most positions the layer can hold (learned positions), or None."""

    init_cache: Callable
    step: Callable
    max_len: int | None = None


class DecodingError(LayerError):
    """A layer asked to decode that has no decoder (it mixes positions some other way)."""


def decoder_of(layer: Layer) -> Decoder:
    """``layer.decoder``, or a DecodingError naming the layer."""
    dec = getattr(layer, "decoder", None)
    if dec is None:
        raise DecodingError(
            f"layer {layer.name!r} has no decoder: generation needs a model built with one "
            "(fundl.models.gpt, fundl.models.char_lm, or layers from fundl.nn.decoding)")
    return dec


def _bound(decoders: Sequence[Decoder | None]) -> int | None:
    """The smallest ``max_len`` among ``decoders`` (None: unbounded)."""
    lens = [d.max_len for d in decoders if d is not None and d.max_len is not None]
    return min(lens) if lens else None


def children_bound(layers: Sequence[Layer]) -> int | None:
    """The most positions a chain of ``layers`` can hold (the smallest child ``max_len``)."""
    return _bound([layer.decoder for layer in layers])


def init_children_cache(layers: Sequence[Layer], names: Sequence[str], params: dict, batch_size: int,
                        max_len: int, dtype) -> dict:
    """The cache of a chain of children: each decoding child's cache under its name."""
    return {name: layer.decoder.init_cache(params.get(name, {}), batch_size, max_len, dtype)
            for layer, name in zip(layers, names) if layer.decoder is not None}


def step_children(layers: Sequence[Layer], names: Sequence[str], params: dict, cache: dict, x, position):
    """Step a chain of children: a child with a decoder through its ``step``, any
    other (a layer acting on each position alone) through ``apply`` in evaluation mode."""
    new_cache = {}
    for layer, name in zip(layers, names):
        p = params.get(name, {})
        try:
            if layer.decoder is not None:
                x, new_cache[name] = layer.decoder.step(p, cache[name], x, position)
            else:
                x, _ = layer.apply(p, {}, x)
        except LayerError as e:
            raise e.within(name) from None
    return x, new_cache
