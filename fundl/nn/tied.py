"""Weight tying: a token embedding and an output head that share one table.

``tied_embedding(vocab, C, *layers)`` looks the ids up in ``w`` (vocab, C),
runs ``layers`` on the vectors, and returns the logits ``h @ w.T``: the
output head is the embedding's transpose (Press & Wolf 2017; GPT-2 and nanoGPT
tie ``wte`` and ``lm_head`` this way), so it has no parameters of its own and
its gradient adds to the embedding's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fundl.nn import init as initializers
from fundl.nn.children import apply_child, check_children, child_key, child_names, init_child, put_nonempty
from fundl.nn.core import Layer, ShapeError, get_param
from fundl.nn.linear import matmul
from fundl.nn.decoding import Decoder, children_bound, init_children_cache, step_children

__all__ = ["tied_embedding"]

EMBEDDING = "embedding"


def tied_embedding(num_embeddings: int, features: int, *layers: Layer, w_init=None, dtype=jnp.float32,
                   name: str = "tied_embedding") -> Layer:
    """Ids (B, T) -> embedding -> ``layers`` -> ``h @ w.T``, logits (B, T, num_embeddings).

    Params: ``embedding`` (``w`` of shape (num_embeddings, features), normal
    with std 1 by default, as :func:`fundl.nn.embedding`) beside each of
    ``layers``' params under its name (as :func:`fundl.nn.serial` names them).
    The last layer must return ``features`` wide vectors.  Its decoder steps
    the children (:mod:`fundl.nn.decoding`) between the lookup and the head.

    Examples:
        >>> model = nn.tied_embedding(50, 16, nn.dense(16), nn.layer_norm())
        >>> params, _, out_shape = model.init(jax.random.key(0), (2, 7))
        >>> sorted(params), out_shape
        (['dense_0', 'embedding', 'layer_norm_0'], (2, 7, 50))
    """
    w_init = w_init or initializers.normal(1.0)
    names = child_names(layers)
    if EMBEDDING in names:
        raise ValueError(f"tied_embedding: a child may not be named {EMBEDDING!r} (the shared table's name)")
    all_names = [EMBEDDING, *names]

    def lookup(params, ids):
        if not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer):
            raise ShapeError(f"{name} expects integer ids, got dtype {jnp.asarray(ids).dtype}")
        w = get_param(get_param(params, EMBEDDING), "w")
        return w, jnp.take(w, ids, axis=0)

    def head(w, h):
        if h.shape[-1] != w.shape[1]:
            raise ShapeError(f"{name}: the layers must return vectors of the embedding's width {w.shape[1]}, "
                             f"got shape {tuple(h.shape)}")
        return matmul(h, w.T.astype(h.dtype))

    def init(key, input_shape):
        params, state = {EMBEDDING: {"w": w_init(jax.random.fold_in(key, 0), (num_embeddings, features), dtype)}}, {}
        shape = tuple(input_shape) + (features,)
        for i, (layer, child) in enumerate(zip(layers, names)):
            p, s, shape = init_child(layer, child, jax.random.fold_in(key, i + 1), shape)
            put_nonempty(params, child, p)
            put_nonempty(state, child, s)
        if shape[-1] != features:
            raise ShapeError(f"{name}: the layers must return vectors of width {features}, got shape {shape}")
        return params, state, tuple(shape[:-1]) + (num_embeddings,)

    def apply(params, state, x, *, key=None, train=False):
        check_children(params, all_names, "params")
        check_children(state, names, "state")
        w, h = lookup(params, x)
        new_state = {}
        for i, (layer, child) in enumerate(zip(layers, names)):
            h, s = apply_child(layer, child, params, state, h, child_key(key, i + 1), train)
            put_nonempty(new_state, child, s)
        return head(w, h), new_state

    def init_cache(params, batch_size, max_len, dtype_=jnp.float32):
        return init_children_cache(layers, names, params, batch_size, max_len, dtype_)

    def step(params, cache, x, position):
        w, h = lookup(params, x)
        h, cache = step_children(layers, names, params, cache, h, position)
        return head(w, h), cache

    return Layer(init, apply, name, decoder=Decoder(init_cache, step, children_bound(layers)))
