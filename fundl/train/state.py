"""The train state: everything a training run needs, as one pytree."""

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from fundl.nn import Layer
from fundl.train.compile_cache import enable_compilation_cache
from fundl.train.loss_scale import LossScale


@struct.dataclass
class TrainState:
    """step, params, model state (e.g. batch-norm statistics), optimiser state, PRNG key,
    and for float16 training the dynamic loss scale (``None`` otherwise: no leaves).

    A plain pytree: it can be jitted, donated, vmapped (ensembles), pmapped,
    saved and compared leaf by leaf.

    ``key`` is the run's base PRNG key as raw key data (``uint32``, e.g.
    shape (2,) for the default threefry implementation); the step wraps it
    (``jax.random.wrap_key_data``), since jit's argument handling of a typed
    key array costs a small step measurable time at every dispatch
    (docs/benchmarks.md, "MLP per step"); a typed key put here by hand still works.

    Examples:
        >>> from fundl.train.state import create_train_state
        >>> from fundl.train.optim import make_optimizer
        >>> state = create_train_state(models.mlp([8], 3), make_optimizer("adam", 1e-3),
        ...                            jax.random.key(0), (1, 4))
        >>> int(state.step), jax.tree.map(jnp.shape, state.params), state.key.shape, state.loss_scale
        (0, {'dense_0': {'b': (8,), 'w': (4, 8)}, 'dense_1': {'b': (3,), 'w': (8, 3)}}, (2,), None)
        >>> state = state.replace(step=state.step + 1)      # a new state: it is immutable
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    key: jax.Array
    loss_scale: LossScale | None = None


def current_step(state) -> int:
    """The step of ``state`` as a Python int: a ``TrainState`` (or a dict with a ``"step"``), plain
    or placed on devices by any placement, one process's view in a multi-process run.  An ensemble's
    members (and pmap's device copies) share the step: the first element is read.

    Examples:
        >>> from fundl.train.state import current_step
        >>> current_step({"step": jnp.int32(7)}), current_step({"step": jnp.full((3,), 7)})  # plain, 3 members
        (7, 7)
    """
    step = state["step"] if isinstance(state, Mapping) else state.step
    if isinstance(step, jax.Array) and not step.is_fully_addressable:
        step = step.addressable_data(0)  # a global array: this process's first copy
    return int(np.asarray(jax.device_get(step)).reshape(-1)[0])


def is_prng_key(x) -> bool:
    """True for a typed PRNG key array (``jax.random.key``), which needs key_data to leave JAX."""
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def create_train_state(model: Layer, optimizer: optax.GradientTransformation, key, input_shape, *,
                       compute_dtype="float32", loss_scale: float | None = None) -> TrainState:
    """Initialise ``model`` on ``input_shape`` (batch included) and ``optimizer`` on its params.

    ``key`` is split into the init key and the run's base key; the step key
    at step ``t`` is ``fold_in(base_key, t)``.  ``compute_dtype`` and
    ``loss_scale`` are the settings ``make_train_step`` gets: float16 with
    ``loss_scale`` None or 0 adds a dynamic :class:`LossScale` (start 2**15);
    any other combination (a fixed scale, float32, bfloat16) adds nothing.

    ``key`` may be a typed key (``jax.random.key(0)``), raw key data or an int seed.
    See :class:`TrainState` for an example.
    """
    enable_compilation_cache()  # the first program of most runs (fundl.train.compile_cache)
    dynamic = uses_dynamic_loss_scale(compute_dtype, loss_scale)
    seed = _int32_seed(key)
    if seed is None and not is_prng_key(key):
        key = jax.random.wrap_key_data(key) if hasattr(key, "shape") and key.shape == (2,) else jax.random.key(key)

    # One compiled program builds the whole state, the PRNG key from an int seed included (run
    # eagerly, every initialiser op and every small array of the state compiles on its own), and
    # on XLA:CPU without LLVM's optimisations, which cost more than this run-once code saves
    # (docs/benchmarks.md, "Start-up").  One jit for every call, the model and optimiser static:
    # the members of an ensemble share one compiled program.
    # Under an outer transform (jit, vmap, grad) the key is a tracer: build inline, since
    # compiler_options are accepted only by a top-level jit.
    static = (model, optimizer, tuple(input_shape), dynamic)
    if isinstance(key, jax.core.Tracer):
        return _build(key, *static)
    arg, backend = key if seed is None else seed, jax.default_backend()
    if _hashable(static):
        return _shared_init_program(backend)(arg, *static)
    return jax.jit(lambda k: _build(k, *static), compiler_options=init_compiler_options(backend))(arg)


def _int32_seed(key) -> np.int32 | None:
    """An int seed that fits int32, as one (the init program then makes the key itself); else None."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool) and -2**31 <= int(key) < 2**31:
        return np.int32(key)
    return None


def _build(key, model: Layer, optimizer: optax.GradientTransformation, input_shape: tuple,
           dynamic_loss_scale: bool) -> TrainState:
    """The initial train state from ``key`` (a typed key, or an int32 seed made into one here)."""
    if not is_prng_key(key):
        key = jax.random.key(key)
    init_key, base_key = jax.random.split(key)
    params, model_state, _ = model.init(init_key, input_shape)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=optimizer.init(params),
        key=jax.random.key_data(base_key),
        loss_scale=LossScale.create() if dynamic_loss_scale else None,
    )


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def init_compiler_options(backend: str | None = None) -> dict | None:
    """The compiler options of a run-once init program on ``backend`` (JAX's default one if None):
    on XLA:CPU, LLVM's optimisations off, which cost more than such code saves (docs/benchmarks.md,
    "Start-up"); None elsewhere."""
    return {"xla_backend_optimization_level": 0} if (backend or jax.default_backend()) == "cpu" else None


@functools.cache
def _shared_init_program(backend: str):
    """``_build`` jitted once per process, the model, optimiser and shape static: calls with the
    same three (an ensemble's members) share one compiled program."""
    return jax.jit(_build, static_argnums=(1, 2, 3, 4), compiler_options=init_compiler_options(backend))


def uses_dynamic_loss_scale(compute_dtype, loss_scale: float | None) -> bool:
    """float16 with no fixed scale (``None`` or 0, the config's "the dtype's default")."""
    if loss_scale is not None and loss_scale < 0:
        raise ValueError(f"loss_scale must be positive (a fixed scale) or 0/None (the dtype's default), "
                         f"got {loss_scale}")
    return not loss_scale and jnp.dtype(compute_dtype) == jnp.float16


def count_params(params) -> int:
    """The number of scalars in ``params`` (every leaf's size, summed)."""
    return int(sum(x.size for x in jax.tree.leaves(params)))
