"""Pure training and evaluation steps, ready for ``jax.jit``.

``make_train_step`` returns ``step(train_state, batch) -> (train_state, metrics)``
where ``batch = {"x": inputs, "y": labels}`` and ``metrics`` are batch means
(``loss`` plus the metrics function's entries).  ``make_eval_step`` returns
masked *sums* and a ``count`` so that averages over batches of unequal size
are exact.

Mixed precision: with ``compute_dtype=jnp.bfloat16`` the float params and
inputs are cast to bfloat16 inside the loss, so activations and matmuls run
in bfloat16 while the master params, gradients and optimiser state stay
float32 (the cast's gradient casts back).  Losses are computed in float32.
bfloat16 has float32's exponent range and needs no loss scaling.

float16 needs loss scaling: the loss is multiplied before differentiation
so small gradients do not flush to zero, and the gradients are divided
after.  By default (``loss_scale`` None or 0) the scale is *dynamic*
(``fundl.train.loss_scale``, the rule of jmp and PyTorch's GradScaler): it
lives in ``train_state.loss_scale`` (build the state with
``create_train_state(..., compute_dtype="float16")``), halves on a
non-finite gradient -- that step's update is skipped, only ``step``
advances -- and doubles after 2000 finite steps; the metrics report it as
``loss_scale``.  A positive ``loss_scale`` is a fixed scale: nothing is
skipped, and a non-finite gradient is left to ``training.nan_policy``.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fundl.losses import softmax_cross_entropy
from fundl.metrics import classification_metrics
from fundl.nn import Layer
from fundl.train import loss_scale as ls_lib
from fundl.train.state import TrainState, is_prng_key, uses_dynamic_loss_scale

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
"""The compute dtypes by name (``training.compute_dtype``)."""


def resolve_dtype(dtype):
    """``"float32"``/``"bfloat16"``/``"float16"`` (or a dtype) as a JAX scalar type."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"compute dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


def cast_floats(tree, dtype):
    """Cast the floating-point leaves of ``tree`` to ``dtype`` (ints, keys untouched)."""

    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x

    return jax.tree.map(cast, tree)


def forward(model, params, model_state, x, key, train, compute_dtype):
    """``model.apply`` as the train and eval steps run it: params and ``x`` cast to ``compute_dtype``
    (floats only), the output in float32, the model state kept in its stored dtype.  Returns
    ``(out, new_model_state)``; steps built elsewhere (DP-SGD, ensembles) call it to match."""
    if compute_dtype != jnp.float32:
        params, x = cast_floats(params, compute_dtype), cast_floats(x, compute_dtype)
    out, new_state = model.apply(params, model_state, x, key=key, train=train)
    # Keep model state (e.g. running statistics) in its stored dtype.
    new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, model_state)
    return jax.tree.map(lambda o: o.astype(jnp.float32), out), new_state


def base_key(state: TrainState) -> jax.Array:
    """The run's base PRNG key as a typed key (``TrainState.key`` holds its raw key data)."""
    return state.key if is_prng_key(state.key) else jax.random.wrap_key_data(state.key)


def make_train_step(model: Layer, optimizer: optax.GradientTransformation,
                    loss_fn: Callable = softmax_cross_entropy,
                    metrics_fn: Callable | None = None, *,
                    compute_dtype=jnp.float32, loss_scale: float | None = None,
                    axis_name: str | None = None):
    """Build ``step(train_state, batch) -> (train_state, metrics)``.

    ``loss_fn(outputs, labels)`` and ``metrics_fn(outputs, labels)`` return
    per-element values (see ``fundl.losses``/``fundl.metrics``); the step
    averages them over the batch.  With ``axis_name`` (inside ``pmap`` or a
    named ``vmap``) gradients, metrics and model state are averaged over that
    axis, so N devices equal one device on the global batch.

    ``compute_dtype``/``loss_scale``: see the module docstring; float16 with
    ``loss_scale`` None or 0 scales dynamically and reads ``state.loss_scale``.

    The step key is ``fold_in(base_key, state.step)`` (and the device index
    under ``axis_name``), so dropout masks depend only on the run's key and the
    step number.  Jit it, with ``donate_argnums=0`` to reuse the state's buffers.

    Examples:
        >>> from fundl.train.optim import make_optimizer
        >>> from fundl.train.state import create_train_state
        >>> from fundl.train.step import make_train_step
        >>> model, opt = models.mlp([8], 3), make_optimizer("adam", 1e-3)
        >>> state = create_train_state(model, opt, jax.random.key(0), (1, 4))
        >>> step = jax.jit(make_train_step(model, opt), donate_argnums=0)
        >>> batch = {"x": jnp.ones((16, 4)), "y": jnp.zeros((16,), jnp.int32)}
        >>> state, metrics = step(state, batch)
        >>> int(state.step), sorted(metrics)
        (1, ['accuracy', 'loss'])
    """
    metrics_fn = classification_metrics() if metrics_fn is None else metrics_fn
    compute_dtype = resolve_dtype(compute_dtype)
    dynamic = uses_dynamic_loss_scale(compute_dtype, loss_scale)
    scale = float(loss_scale or 1.0)  # the fixed scale; 1.0 (none) when dynamic

    def step(state: TrainState, batch) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(base_key(state), state.step)
        if axis_name is not None:  # distinct dropout masks per device, deterministic
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        ls = state.loss_scale
        if dynamic and ls is None:
            raise ValueError("float16 training with a dynamic loss scale needs it in the train state: build the "
                             "state with create_train_state(..., compute_dtype='float16'), or pass a fixed "
                             "loss_scale > 0 to make_train_step")

        def objective(params):
            out, new_model_state = forward(model, params, state.model_state, batch["x"], key, True, compute_dtype)
            loss = jnp.mean(loss_fn(out, batch["y"]))
            scaled = ls_lib.scale_loss(ls, loss) if dynamic else loss * scale
            return scaled, (loss, out, new_model_state)

        grads, (loss, out, new_model_state) = jax.grad(objective, has_aux=True)(state.params)
        if dynamic:
            grads = ls_lib.unscale(ls, grads)
        elif scale != 1.0:
            grads = jax.tree.map(lambda g: g / scale, grads)
        metrics = {"loss": loss, **{k: jnp.mean(v) for k, v in metrics_fn(out, batch["y"]).items()}}
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            metrics = jax.lax.pmean(metrics, axis_name)
            new_model_state = jax.lax.pmean(new_model_state, axis_name)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if dynamic:  # decided after the pmean, so every device skips (or applies) alike
            finite = ls_lib.all_finite(grads)
            params, new_model_state, opt_state = ls_lib.select(
                finite, (params, new_model_state, opt_state), (state.params, state.model_state, state.opt_state))
            state = state.replace(loss_scale=ls_lib.update(ls, finite))
            metrics["loss_scale"] = ls.scale  # the scale this step used
        new_state = state.replace(step=state.step + 1, params=params,
                                  model_state=new_model_state, opt_state=opt_state)
        return new_state, metrics

    return step


def make_eval_step(model: Layer, loss_fn: Callable = softmax_cross_entropy,
                   metrics_fn: Callable | None = None, *, compute_dtype=jnp.float32,
                   axis_name: str | None = None):
    """Build ``eval_step(params, model_state, batch) -> sums``.

    ``batch`` may hold a ``"mask"`` (1 for real examples, 0 for padding), so
    a short final batch can be padded to the compiled shape.  Returns sums of
    ``loss`` and of every metric over real elements, and their ``count``;
    :func:`fundl.train.loop.evaluate` turns them into exact means over a split.

    Examples:
        >>> from fundl.train.step import make_eval_step
        >>> model = models.mlp([8], 3)
        >>> params, model_state, _ = model.init(jax.random.key(0), (1, 4))
        >>> mask = jnp.array([1.0] * 10 + [0.0] * 6)                  # 10 real rows, 6 padding
        >>> batch = {"x": jnp.ones((16, 4)), "y": jnp.zeros((16,), jnp.int32), "mask": mask}
        >>> sums = jax.jit(make_eval_step(model))(params, model_state, batch)
        >>> sorted(sums), float(sums["count"])
        (['accuracy', 'count', 'loss'], 10.0)
    """
    metrics_fn = classification_metrics() if metrics_fn is None else metrics_fn
    compute_dtype = resolve_dtype(compute_dtype)

    def eval_step(params, model_state, batch) -> dict:
        out, _ = forward(model, params, model_state, batch["x"], None, False, compute_dtype)
        values = {"loss": loss_fn(out, batch["y"]), **metrics_fn(out, batch["y"])}
        mask = batch.get("mask")
        if mask is None:
            mask = jnp.ones(batch["y"].shape[:1], jnp.float32)
        def masked_sum(v):
            m = mask.reshape(mask.shape + (1,) * (v.ndim - 1))
            return jnp.sum(v * m)
        sums = {k: masked_sum(v) for k, v in values.items()}
        per_example = values["loss"][0].size if values["loss"].ndim > 1 else 1
        sums["count"] = jnp.sum(mask) * per_example
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        return sums

    return eval_step


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


def _has_convolution(jaxpr) -> bool:
    return "conv_general_dilated" in _primitives(jaxpr)


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


# steps_per_call = "auto": optimiser steps fused per dispatch, by what the step computes, as
# measured through ``fit`` on XLA:CPU, 2 cores (docs/benchmarks.md, "End to end"; compile time
# counted, since it is part of a run): dense steps gain ~35% from 10 rolled steps per dispatch
# (the MNIST MLP: 1.05k -> 1.44k steps/s); fusing convolutions needs a fully unrolled scan
# (a rolled one runs 3-6x slower), whose extra compile time (+1.5 s for 5 steps of the
# MNIST-1D CNN, +3.4 s for 10) cancels its 10-20% faster steps over a 6000-step run;
# recurrent steps (25 ms each) gain nothing measurable from fusion.
AUTO_STEPS_PER_CALL = {"conv": 1, "dense": 10, "recurrent": 1}
"""Optimiser steps per dispatch that ``steps_per_call="auto"`` picks, by :func:`step_family`."""


def resolve_fusion(steps_per_call, unroll, family: str) -> tuple[int, bool | int]:
    """``(steps_per_call, unroll)`` with ``"auto"`` replaced by the measured choice for ``family``.

    unroll: fully unrolled (True) for convolutions, rolled (1) otherwise, as
    :func:`make_multi_step` measured; the config's 0 means fully (True).
    """
    if steps_per_call == "auto":
        steps_per_call = AUTO_STEPS_PER_CALL[family]
    if unroll == "auto":
        unroll = True if family == "conv" else 1
    elif unroll == 0 and not isinstance(unroll, bool):
        unroll = True
    if not isinstance(steps_per_call, int) or isinstance(steps_per_call, bool) or steps_per_call < 1:
        raise ValueError(f"steps_per_call must be a positive int or 'auto', got {steps_per_call!r}")
    return steps_per_call, unroll if steps_per_call > 1 else 1  # one step per call: nothing to unroll


def make_multi_step(train_step, *, unroll: bool | int | str = 1):
    """Fuse K optimiser steps into one call: ``multi(state, batches)`` where every
    leaf of ``batches`` has a leading axis of K.  Runs ``lax.scan`` over the
    batches; returns the final state and the per-step metrics stacked (K, ...).

    With a rolled or partly unrolled scan (``unroll`` an int smaller than K)
    the results are bit-identical to K separate calls of ``train_step``; only
    dispatch overhead is saved.  ``unroll=True`` (or ``0``, as the config
    writes it) unrolls fully (XLA:CPU
    compiles convolutions better that way) and lets XLA optimise across
    steps, so results then agree with separate steps to float32 rounding
    (~1e-9 after a few steps), not bit for bit.

    ``unroll="auto"`` picks by what the step holds, as measured on XLA:CPU
    (``scripts/benchmark.py --unroll-study``, docs/benchmarks.md): fully
    unrolled when the step contains a convolution (a rolled scan ran the
    CNN step 6-15x slower: its backward convolutions are left in
    non-canonical layouts), rolled (``1``) otherwise (unrolling made dense
    and recurrent steps no faster, recurrent ones up to 1.5x slower, and
    compiles take several times longer).
    """

    def multi(state, batches):
        # 0 (the config's "fully") means True; a bool is taken as is (False == 0 too).
        u = True if (unroll == 0 and not isinstance(unroll, bool)) else unroll
        if u == "auto":
            first = jax.tree.map(lambda b: b[0], batches)
            u = True if _has_convolution(jax.make_jaxpr(train_step)(state, first).jaxpr) else 1
        return jax.lax.scan(train_step, state, batches, unroll=u)

    return multi
