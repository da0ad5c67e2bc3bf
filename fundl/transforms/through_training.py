"""Gradients through training: K real training steps as one differentiable function.

``unrolled_training(train_step, state, batches)`` runs the ordinary step
(``fundl.train.step.make_train_step``, any Optax optimiser) over the K
batches stacked in ``batches`` with ``jax.lax.scan``.  The result is an
ordinary JAX function of its inputs, so ``jax.grad`` of a validation loss
computed from the final state reaches back through all K steps: to the
learning rate, the initial params, or the data::

    def val_loss(log_lr):
        s = with_learning_rate(state, jnp.exp(log_lr))      # optimiser built with inject_hyperparams
        s, _ = unrolled_training(step, s, batches)          # K real steps
        return loss_of(s.params, val_batch)
    jax.grad(val_loss)(jnp.log(1e-3))

What can be differentiated is what is an *input* of the scanned function:

* the learning rate (any injected hyper-parameter): it must live in the
  optimiser state, which is what ``optax.inject_hyperparams`` does;
  :func:`with_learning_rate` puts a (traced) value there.  A rate passed to
  ``optax.adam(lr)`` is a closure constant and has no gradient.
* an initialisation scale: :func:`scale_params` multiplies the initial params.
* per-example data weights: :func:`make_weighted_train_step` is
  ``make_train_step`` whose loss is ``mean(weight * loss_i)`` with ``weight``
  read from the batch (``batch["weight"]``, shape (B,), or (K, B) stacked).

Memory: reverse-mode through a scan keeps what each step's backward pass
needs, for every step.  With ``remat=True`` (the default) the step runs under
``jax.checkpoint``: the forward pass keeps only each step's input state (a
TrainState: params, optimiser state, ...) and the backward pass recomputes the
step's activations, so memory is O(K) train states plus one step's
activations, at the cost of one more forward pass per step.  Measured in
docs/transforms.md ("Gradients through training") with XLA's memory analysis.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fundl.losses import softmax_cross_entropy
from fundl.metrics import classification_metrics
from fundl.train.optim import set_hyperparams
from fundl.train.state import TrainState
from fundl.train.step import make_train_step

__all__ = ["unrolled_training", "with_learning_rate", "with_hyperparams", "scale_params",
           "make_weighted_train_step"]


def unrolled_training(train_step: Callable, state: TrainState, batches, *, remat: bool = True,
                      unroll: int | bool = 1):
    """Run ``train_step`` over ``batches`` (every leaf with a leading axis K) in ``lax.scan``.

    Returns ``(final_state, metrics)`` with the metrics stacked (K, ...), exactly
    as K calls of ``train_step`` (``fundl.train.fusion.make_multi_step`` is this scan
    without ``jax.checkpoint``).  Differentiable end to end in everything the
    state and the batches hold.

    ``remat=True`` wraps the step in ``jax.checkpoint``: under ``grad`` the scan
    keeps one train state per step and recomputes each step's activations in
    the backward pass (memory O(K) states); values and gradients are unchanged.
    ``remat=False`` keeps every step's residuals (activations included): faster
    when they fit.  ``unroll`` is passed to ``lax.scan``.
    """
    leaves = jax.tree.leaves(batches)
    if not leaves:
        raise ValueError("unrolled_training: batches hold no arrays")
    k = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if len(k) != 1 or None in k:
        raise ValueError("unrolled_training: every leaf of batches needs the same leading axis K (one "
                         f"batch per step); got leading sizes {sorted(map(str, k))}")
    step = jax.checkpoint(train_step) if remat else train_step
    return jax.lax.scan(step, state, batches, unroll=unroll)


_INJECT_HINT = ("build the optimiser with optax.inject_hyperparams, e.g. "
                "optax.inject_hyperparams(optax.adam)(learning_rate=1e-3), or with "
                "fundl.run.optimizer.optimizer_from_config(config, total_steps, inject=('learning_rate',)), "
                "and the train state from that optimiser; a rate passed to optax.adam(lr) is a constant of "
                "the compiled step and has no gradient")


def with_hyperparams(state: TrainState, **values) -> TrainState:
    """``state`` with injected optimiser hyper-parameters set to ``values`` (may be traced).

    The value is cast to the stored dtype; the gradient flows through the cast.
    Raises a ValueError saying how to build the optimiser if none is injected.
    """
    try:
        return state.replace(opt_state=set_hyperparams(state.opt_state, **values))
    except ValueError as e:
        raise ValueError(f"cannot set {sorted(values)} in this train state ({e}); to differentiate with "
                         f"respect to it, {_INJECT_HINT}") from None


def with_learning_rate(state: TrainState, learning_rate) -> TrainState:
    """``state`` whose optimiser uses ``learning_rate`` (an array, e.g. ``jnp.exp(log_lr)``).

    The optimiser must keep its rate in its state (``optax.inject_hyperparams``);
    with a schedule from ``optimizer_from_config(..., inject=('learning_rate',))``
    the schedule scales this rate.
    """
    return with_hyperparams(state, learning_rate=learning_rate)


def _path_str(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def scale_params(state: TrainState, scale, *, where: Callable[[str, jax.Array], bool] | None = None
                 ) -> TrainState:
    """``state`` with its params multiplied by ``scale`` (a scalar, may be traced).

    ``where(path, leaf) -> bool`` chooses the leaves (``path`` like
    ``"dense_0/w"``); by default every floating-point leaf.  E.g.
    ``where=lambda path, _: path.endswith("/w")`` scales the weight matrices
    and leaves biases and norm scales alone.

    The optimiser state is left as it is: right for optimisers whose state
    starts from zeros whatever the params (SGD, the Adam family, RMSProp,
    ...); one that copies the params at init (e.g. lookahead) needs
    ``optimizer.init`` on the scaled params.
    """
    def f(path, p):
        if not jnp.issubdtype(jnp.result_type(p), jnp.floating):
            return p
        if where is not None and not where(_path_str(path), p):
            return p
        return p * jnp.asarray(scale, p.dtype)

    return state.replace(params=jax.tree_util.tree_map_with_path(f, state.params))


def make_weighted_train_step(model, optimizer: optax.GradientTransformation,
                             loss_fn: Callable = softmax_cross_entropy, metrics_fn: Callable | None = None,
                             **step_kwargs) -> Callable:
    """``make_train_step`` whose batches carry per-example weights: ``{"x", "y", "weight"}``.

    The loss is ``mean(weight[i] * loss_i)`` over the batch (a per-element loss
    of shape (B, T, ...) is weighted per example); with all weights 1 the step
    equals ``make_train_step``'s.  Weights are an input of the step, so
    ``jax.grad`` through :func:`unrolled_training` gives the validation loss's
    derivative with respect to each training example's weight.  The metrics
    (accuracy, ...) are unweighted; ``loss`` is the weighted loss.
    ``step_kwargs`` go to ``make_train_step`` (``compute_dtype``, ``axis_name``, ...).
    """
    metrics_fn = classification_metrics() if metrics_fn is None else metrics_fn

    def weighted_loss(outputs, labels):
        per = loss_fn(outputs, labels["y"])
        w = labels["weight"].astype(per.dtype)
        return per * w.reshape(w.shape + (1,) * (per.ndim - w.ndim))

    def metrics(outputs, labels):
        return metrics_fn(outputs, labels["y"])

    inner = make_train_step(model, optimizer, weighted_loss, metrics, **step_kwargs)

    def step(state: TrainState, batch) -> tuple[TrainState, dict]:
        if "weight" not in batch:
            raise ValueError(f"a weighted train step needs batch['weight'] (one weight per example); "
                             f"got keys {sorted(batch)}")
        if jnp.shape(batch["weight"]) != jnp.shape(batch["y"])[:1]:
            raise ValueError(f"batch['weight'] needs shape {jnp.shape(batch['y'])[:1]} (one per example), "
                             f"got {jnp.shape(batch['weight'])}")
        return inner(state, {**batch, "y": {"y": batch["y"], "weight": batch["weight"]}})

    return step
