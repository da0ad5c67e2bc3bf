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

    step.model = model  # fit checks its data against the model's classes (fundl.train.data_checks)
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

    eval_step.model = model  # evaluate checks its data against the model's classes (fundl.train.data_checks)
    return eval_step
