"""Fused steps: K optimiser steps in one dispatch, and the one rule that picks K and the unroll.

A dispatch (one call of a compiled step) costs host time; ``lax.scan`` over K
batches runs K steps in one dispatch.  How much that gains depends on what
the step computes, so ``"auto"`` is decided by the step's family, read from
its jaxpr (:func:`step_family`), with choices measured through ``fit``
(docs/benchmarks.md, "End to end" and "Fused steps").  :func:`resolve` is the
only place where ``"auto"`` becomes numbers; :func:`make_multi_step` builds
the fused step for a concrete unroll.

Examples:
    >>> from fundl.train.fusion import Fusion, resolve
    >>> from fundl.train.optim import make_optimizer
    >>> from fundl.train.state import create_train_state
    >>> from fundl.train.step import make_train_step
    >>> model, opt = models.mlp([8], 3), make_optimizer("sgd", 0.1)
    >>> state = create_train_state(model, opt, jax.random.key(0), (1, 4))
    >>> batch = {"x": jnp.ones((16, 4)), "y": jnp.zeros((16,), jnp.int32)}
    >>> resolve(Fusion(), make_train_step(model, opt), state, batch)      # a dense step: fused, rolled
    (10, 1)
    >>> resolve(Fusion(steps_per_call=4, unroll=0), make_train_step(model, opt), state, batch)
    (4, True)
    >>> resolve(Fusion(), make_train_step(model, opt), state, batch, steps=100)   # too short to repay
    (1, 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

FAMILIES = ("conv", "dense", "recurrent")
"""What :func:`step_family` tells apart."""

# Dense steps are short, so the dispatch is a sizeable part of them: fusing pays.  Fused convolution
# steps need a fully unrolled scan, whose compile time cancels their gain over a run; recurrent steps
# are long and gain nothing measurable.  Figures: docs/benchmarks.md, "End to end".
AUTO_STEPS_PER_CALL = {"conv": 1, "dense": 10, "recurrent": 1}
"""Optimiser steps per dispatch that ``steps_per_call="auto"`` picks, by :func:`step_family`."""

# XLA:CPU runs a rolled scan over convolution steps far slower (their backward convolutions stay in
# non-canonical layouts); unrolling dense and recurrent steps gains nothing and compiles longer.
# Figures: docs/benchmarks.md, "Fused steps".
AUTO_UNROLL = {"conv": True, "dense": 1, "recurrent": 1}
"""The ``lax.scan`` unroll that ``unroll="auto"`` picks, by :func:`step_family` (True: fully)."""


# A fused program is one more program to compile (a rolled scan of the step: about as long as the
# step's own compile); it repays that only through the dispatches it saves, so a short run
# (a notebook cell, a smoke test) fuses nothing.  Break-even figures: docs/benchmarks.md, "First step".
AUTO_MIN_STEPS = 2000
"""``steps_per_call="auto"`` fuses only a run of at least this many steps (when ``fit`` says its length)."""


@dataclass(frozen=True)
class Fusion:
    """How ``fit`` fuses optimiser steps: ``steps_per_call`` (K steps per dispatch, an int >= 1)
    and ``unroll`` (of the ``lax.scan`` over them: an int >= 1, ``True``/``0`` for fully,
    ``False`` for rolled), each ``"auto"`` or a value.  ``Fusion()`` is what ``fit``'s
    ``fusion="auto"`` means; :func:`resolve` turns it into numbers."""

    steps_per_call: int | str = "auto"
    unroll: bool | int | str = "auto"

    def __post_init__(self):
        k, u = self.steps_per_call, self.unroll
        if k != "auto" and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ValueError(f"steps_per_call must be a positive int or 'auto', got {k!r}")
        if u != "auto" and (not isinstance(u, int) or u < 0):
            raise ValueError(f"unroll must be 'auto', a bool or an int >= 0 (0: fully), got {u!r}")


def _primitives(jaxpr, found=None) -> set[str]:
    """Names of the primitives in a jaxpr and in every jaxpr nested in its equations (jit, scan, ...)."""
    found = set() if found is None else found
    for eqn in jaxpr.eqns:
        found.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
                if hasattr(sub, "eqns"):
                    _primitives(sub, found)
    return found


def step_family(train_step, state, batch, *, axis_name: str | None = None) -> str:
    """``"conv"``, ``"recurrent"`` or ``"dense"``: what the step computes, read from its jaxpr
    (traced abstractly, no FLOPs).  ``batch`` is one step's batch (arrays or ShapeDtypeStructs);
    a step built with ``axis_name`` (for pmap) is traced under a one-member named ``vmap``."""
    fn = train_step
    if axis_name is not None:
        one = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct((1,) + tuple(jnp.shape(x)), x.dtype), tree)
        fn, state, batch = jax.vmap(train_step, axis_name=axis_name), one(state), one(batch)
    prims = _primitives(jax.make_jaxpr(fn)(state, batch).jaxpr)
    if "conv_general_dilated" in prims:
        return "conv"
    return "recurrent" if prims & {"scan", "while"} else "dense"


def resolve(fusion: Fusion | str, train_step, state, batch, *,
            axis_name: str | None = None, steps: int | None = None) -> tuple[int, bool | int]:
    """``(steps_per_call, unroll)`` to compile: ``"auto"`` replaced by the choice for the step's
    family (traced only when something is ``"auto"``), unroll ``0`` by ``True`` (fully), and unroll
    ``1`` when one step per call leaves nothing to unroll.  ``fusion`` is a :class:`Fusion` or
    ``"auto"``; ``state`` and ``batch`` are one step's (see :func:`step_family`).  ``steps``: how
    many steps the run has left (``fit`` passes it); an ``"auto"`` ``steps_per_call`` is 1 below
    :data:`AUTO_MIN_STEPS`, where the fused program's compile would cost more than it saves."""
    if isinstance(fusion, str):
        if fusion != "auto":
            raise ValueError(f"fusion must be 'auto' or a fundl.train.fusion.Fusion, got {fusion!r}")
        fusion = Fusion()
    k, unroll = fusion.steps_per_call, fusion.unroll
    if k == "auto" and steps is not None and steps < AUTO_MIN_STEPS:
        k = 1  # the fused program's compile is not repaid in a short run
    if "auto" in (k, unroll):
        family = step_family(train_step, state, batch, axis_name=axis_name)
        k = AUTO_STEPS_PER_CALL[family] if k == "auto" else k
        unroll = AUTO_UNROLL[family] if unroll == "auto" else unroll
    if unroll == 0 and not isinstance(unroll, bool):
        unroll = True
    return k, unroll if k > 1 else 1


def make_multi_step(train_step, *, unroll: bool | int = 1):
    """Fuse K optimiser steps into one call: ``multi(state, batches)`` where every
    leaf of ``batches`` has a leading axis of K.  Runs ``lax.scan`` over the
    batches; returns the final state and the per-step metrics stacked (K, ...).

    With a rolled or partly unrolled scan (``unroll`` an int smaller than K, or
    ``False``) the results are bit-identical to K separate calls of
    ``train_step``; only dispatch overhead is saved.  ``unroll=True`` (or
    ``0``, as the config writes it) unrolls fully and lets XLA optimise across
    steps, so results then agree with separate steps to float32 rounding, not
    bit for bit.  Which unroll suits a step is :func:`resolve`'s business.

    Examples:
        >>> from fundl.train.fusion import make_multi_step
        >>> from fundl.train.optim import make_optimizer
        >>> from fundl.train.state import create_train_state
        >>> from fundl.train.step import make_train_step
        >>> model, opt = models.mlp([8], 3), make_optimizer("sgd", 0.1)
        >>> state = create_train_state(model, opt, jax.random.key(0), (1, 4))
        >>> batches = {"x": jnp.ones((5, 16, 4)), "y": jnp.zeros((5, 16), jnp.int32)}   # K = 5
        >>> state, metrics = jax.jit(make_multi_step(make_train_step(model, opt)))(state, batches)
        >>> int(state.step), metrics["loss"].shape
        (5, (5,))
    """
    if not isinstance(unroll, int) or unroll < 0:
        raise ValueError(f"make_multi_step: unroll must be a bool or an int >= 0 (0: fully), got {unroll!r}; "
                         f"fundl.train.fusion.resolve turns 'auto' into one")
    u = True if (unroll == 0 and not isinstance(unroll, bool)) else unroll  # False (rolled) == 0 too

    def multi(state, batches):
        return jax.lax.scan(train_step, state, batches, unroll=u)

    return multi
