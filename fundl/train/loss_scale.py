"""Dynamic loss scaling for float16 training.

float16 has 5 exponent bits: values below ~6e-8 flush to zero and above
65504 overflow to inf.  Small gradients are kept representable by
multiplying the loss by a large ``scale`` before differentiation and
dividing the (float32) gradients by it afterwards.  The scale adapts:

* start at ``2**15``;
* a step whose gradients are all finite is applied and counted; after
  ``growth_interval`` (2000) consecutive finite steps the scale is multiplied
  by ``factor`` (2) and the count restarts;
* a step with a non-finite gradient is *skipped* (the caller keeps params,
  optimiser state and model state), the scale is divided by ``factor``
  (never below ``min_scale`` = 1) and the count restarts.

This is the rule of DeepMind's ``jmp.DynamicLossScale`` (``period``,
``factor``, ``min_loss_scale``) and of PyTorch's ``torch.cuda.amp.GradScaler``
(``init_scale=2**16``, ``growth_interval=2000``, ``growth_factor=2``,
``backoff_factor=0.5``), with jmp's starting scale.

:class:`LossScale` is a pytree whose leaves are the float32 ``scale`` and
the int32 ``good_steps``; the settings are static fields (part of the tree
structure, not leaves), so it jits, vmaps, scans and checkpoints like any
other state::

    ls = LossScale.create()                    # or create(growth_interval=100)
    grads = unscale(ls, jax.grad(lambda p: scale_loss(ls, loss(p)))(params))
    finite = all_finite(grads)                 # after any cross-device pmean
    ls = update(ls, finite)                    # and skip the update if not finite
"""

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class LossScale:
    """The dynamic loss scale: a pytree of two scalars, with the rule's settings as static fields.

    ``scale`` (float32) multiplies the loss; ``good_steps`` (int32) counts consecutive
    finite steps since the scale last changed.  Build it with :meth:`create`.

    Examples:
        >>> ls = LossScale.create()
        >>> float(ls.scale), int(ls.good_steps)
        (32768.0, 0)
        >>> float(update(ls, jnp.array(False)).scale)     # a non-finite step halves it
        16384.0
    """

    scale: jax.Array       # float32 scalar
    good_steps: jax.Array  # int32 scalar: consecutive finite steps since the last change
    growth_interval: int = struct.field(pytree_node=False, default=2000)
    factor: float = struct.field(pytree_node=False, default=2.0)
    min_scale: float = struct.field(pytree_node=False, default=1.0)

    @classmethod
    def create(cls, scale: float = 2.0**15, *, growth_interval: int = 2000, factor: float = 2.0,
               min_scale: float = 1.0) -> "LossScale":
        """A fresh scale (``good_steps`` 0); the defaults are jmp's and GradScaler's rule."""
        if scale <= 0 or factor <= 1 or growth_interval < 1 or min_scale <= 0:
            raise ValueError("LossScale needs scale > 0, factor > 1, growth_interval >= 1 and min_scale > 0; "
                             f"got scale={scale}, factor={factor}, growth_interval={growth_interval}, "
                             f"min_scale={min_scale}")
        return cls(jnp.asarray(scale, jnp.float32), jnp.zeros((), jnp.int32),
                   int(growth_interval), float(factor), float(min_scale))


def scale_loss(ls: LossScale, loss):
    """``loss * scale``, in the loss's dtype: differentiate this instead of the loss."""
    return loss * ls.scale.astype(loss.dtype)


def unscale(ls: LossScale, grads):
    """The gradients of the scaled loss divided by ``scale``: the true gradients."""
    return jax.tree.map(lambda g: g / ls.scale.astype(g.dtype), grads)


def all_finite(tree) -> jax.Array:
    """A bool scalar: every leaf of ``tree`` is finite."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def update(ls: LossScale, finite) -> LossScale:
    """The loss scale after a step whose gradients were (not) ``finite``."""
    good = ls.good_steps + 1
    grow = good >= ls.growth_interval
    scale = jnp.where(finite, jnp.where(grow, ls.scale * ls.factor, ls.scale),
                      jnp.maximum(ls.scale / ls.factor, ls.min_scale))
    good_steps = jnp.where(finite & ~grow, good, 0)
    return ls.replace(scale=scale.astype(jnp.float32), good_steps=good_steps.astype(jnp.int32))


def select(finite, new, old):
    """``new`` where ``finite`` else ``old``, leaf by leaf (bit-identical ``old`` on a skip)."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
