"""Per-example gradients: ``vmap(grad(loss))`` over the examples of a batch.

Each example is run as a batch of one (a leading axis of 1 is added back
inside the ``vmap``), so any fundl model works unchanged: its layers see the
``(batch, ...)`` shapes they always see.

Layers that couple the examples of a batch make per-example gradients
meaningless.  Batch norm in training mode is the one in fundl: it normalises
every example with statistics of the whole batch, so "the gradient of example
i's loss" depends on the other examples, and on a batch of one it computes a
different function altogether.  :func:`per_example_grads` detects this and
raises :class:`ExampleCouplingError` naming the layer, rather than returning
wrong numbers.

How the coupling is detected: a model's state is threaded through
``per_example_grads`` (``model_state=``), and the state the loss returns must
be the same for every example -- ``vmap`` is asked to return it *unbatched*
(``out_axes=None``), which JAX refuses exactly when the returned state
depends on the example.  Batch norm's running statistics in training mode
depend on the batch's values, so they are caught; layers whose state does
not depend on the data (and batch norm with ``train=False``, which only
reads its frozen statistics) pass.  The check is structural (it runs on
abstract values while tracing, no FLOPs) and needs no list of layer names or
markers on layers, so a user's own stateful layer is judged by the same
rule.  What it cannot see is a layer that mixes examples *without* state; no
fundl layer does, and such a layer should keep state or document it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fundl.nn.core import LayerError


class ExampleCouplingError(LayerError):
    """A layer couples the examples of a batch (batch norm in training), so per-example
    gradients, and DP-SGD's per-example clipping, are not defined for the model."""


def _batch_size(batch) -> int:
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
    if not sizes or None in sizes or len(sizes) != 1:
        shapes = jax.tree.map(jnp.shape, batch)
        raise ValueError(f"per_example_grads: every leaf of the batch needs the same leading (example) axis, "
                         f"got shapes {shapes}")
    return sizes.pop()


def _path_name(path) -> tuple[str, ...]:
    """A state leaf's key path -> the layer path (dict keys, the statistic's own name dropped)."""
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return tuple(keys[:-1])


def _check_uncoupled(state_fn, params, batch, index) -> None:
    """Raise ExampleCouplingError if the state ``state_fn`` returns depends on the example.

    ``state_fn(params, example, i) -> new_model_state``.  Traced abstractly only.
    """
    probe = jax.eval_shape(jax.vmap(state_fn, in_axes=(None, 0, 0)), params, batch, index)  # real errors surface here
    leaves = jax.tree_util.tree_flatten_with_path(probe)[0]
    if not leaves:
        return
    try:
        jax.eval_shape(jax.vmap(state_fn, in_axes=(None, 0, 0), out_axes=None), params, batch, index)
        return
    except ValueError:
        pass  # some leaf depends on the example: find which, to name the layers
    coupled: list[tuple[str, ...]] = []
    for i, (path, _) in enumerate(leaves):
        leaf_fn = lambda p, ex, j, i=i: jax.tree.leaves(state_fn(p, ex, j))[i]
        try:
            jax.eval_shape(jax.vmap(leaf_fn, in_axes=(None, 0, 0), out_axes=None), params, batch, index)
        except ValueError:
            name = _path_name(path)
            if name not in coupled:
                coupled.append(name)
    where = ", ".join(repr("/".join(n) or "<top>") for n in coupled)
    raise ExampleCouplingError(
        "this layer's training-mode state depends on the examples of the batch (batch norm's running "
        "statistics do: it normalises every example with statistics of the whole batch), so the layer couples "
        "examples and per-example gradients -- and DP-SGD's per-example clipping -- are not defined for the "
        f"model (coupled layers: {where}). Use nn.layer_norm or nn.group_norm instead of nn.batch_norm "
        "(model.batch_norm = false in a config), or apply the model with train=False (frozen statistics).",
        coupled[0] if coupled else ())


def per_example_grads(loss_fn: Callable, params, batch, *, model_state: Any = None, key=None,
                      has_aux: bool = False):
    """Gradients of ``loss_fn`` w.r.t. ``params`` for every example of ``batch``, stacked on a
    leading axis (each leaf of the result is ``(N,) + param.shape``).

    ``batch``: a pytree whose leaves share a leading axis of N examples.
    ``loss_fn`` is called on one example at a time, as a batch of one (every
    leaf with a leading axis of 1), under ``jax.vmap``:

    * ``loss_fn(params, example) -> loss`` (a scalar), or ``(loss, aux)`` with ``has_aux``;
    * with ``key`` (a PRNG key, e.g. for dropout) it also gets ``key=fold_in(key, i)`` for example i,
      so examples draw independent masks;
    * with ``model_state`` it also gets ``model_state=model_state`` and returns
      ``(loss, new_model_state)`` -- or ``(loss, (new_model_state, aux))`` with ``has_aux`` -- as
      ``model.apply`` returns its state.  The new state must be the same for every example;
      a model whose state depends on the examples (batch norm in training) couples them and raises
      :class:`ExampleCouplingError` naming the layer (see the module docstring).

    Returns ``grads``; with ``has_aux`` ``(grads, aux)`` (aux stacked per example); with
    ``model_state`` ``(grads, new_model_state)`` or ``(grads, (new_model_state, aux))``.

    Equals a Python loop of ``jax.grad`` over single examples (tests/test_per_example.py), and
    composes with ``jit`` (the check runs while tracing).
    """
    n = _batch_size(batch)
    index = jnp.arange(n, dtype=jnp.uint32)
    with_state = model_state is not None

    def one(p, example, i):
        ex = jax.tree.map(lambda a: a[None], example)
        kwargs = {}
        if with_state:
            kwargs["model_state"] = model_state
        if key is not None:
            kwargs["key"] = jax.random.fold_in(key, i)
        return loss_fn(p, ex, **kwargs)

    if with_state:
        def state_of(p, example, i):
            out = one(p, example, i)
            return out[1][0] if has_aux else out[1]
        _check_uncoupled(state_of, params, batch, index)

    grad_fn = jax.grad(one, has_aux=has_aux or with_state)
    if with_state and has_aux:
        out_axes = (0, (None, 0))
    elif with_state:
        out_axes = (0, None)
    else:
        out_axes = 0
    return jax.vmap(grad_fn, in_axes=(None, 0, 0), out_axes=out_axes)(params, batch, index)


def model_loss(model, loss_fn: Callable | None = None, *, train: bool = True) -> Callable:
    """``f(params, batch, *, model_state, key=None) -> (loss, new_model_state)`` for a fundl model:
    the mean of ``loss_fn(outputs, batch["y"])`` (per-element, as ``fundl.losses``) with
    ``outputs, new_model_state = model.apply(params, model_state, batch["x"], key=key, train=train)``,
    ready for ``per_example_grads(model_loss(model), params, batch, model_state=state, key=key)``."""
    if loss_fn is None:
        from fundl.losses import softmax_cross_entropy as loss_fn

    def f(params, batch, *, model_state, key=None):
        out, new_state = model.apply(params, model_state, batch["x"], key=key, train=train)
        return jnp.mean(loss_fn(out, batch["y"])), new_state

    return f


def global_norms(grads) -> jax.Array:
    """Per-example L2 norm over the whole param tree: ``(N,)`` for grads with a leading axis N."""
    leaves = jax.tree.leaves(grads)
    sq = sum(jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1) for g in leaves)
    return jnp.sqrt(sq)
