"""Optax optimisers and learning-rate schedules built from plain settings.

``make_schedule`` and ``make_optimizer`` take keyword settings and return
ordinary Optax objects; anything Optax offers can also be passed directly
to the training step instead.  A setting they cannot honour is an
:class:`OptimizerError` naming the argument.  (A config's ``[optimizer]`` and
``[schedule]`` sections reach them through ``fundl.run.optimizer``; see
docs/optimizers.md.)
"""

import inspect

import jax
import jax.numpy as jnp
import optax


class OptimizerError(ValueError):
    """An optimiser or schedule setting that cannot work; ``argument`` names the argument at fault."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


SCHEDULES = ("constant", "cosine", "warmup_cosine", "exponential", "piecewise")
"""The schedule names ``make_schedule`` (and ``[schedule] name``) accept."""


def make_schedule(learning_rate: float, total_steps: int, *, name: str = "constant",
                  warmup_steps: int = 0, end_value: float = 0.0, decay_rate: float = 0.1,
                  transition_steps: int = 0, staircase: bool = False,
                  boundaries: list | tuple = (), scales: list | tuple = ()) -> optax.Schedule:
    """A learning-rate schedule ``step -> lr`` (an ``optax.Schedule``), by ``name``:

    * ``"constant"``: ``learning_rate`` throughout;
    * ``"cosine"``: cosine decay to ``end_value`` over ``total_steps``;
    * ``"warmup_cosine"``: linear warm-up from 0 for ``warmup_steps``, then cosine;
    * ``"exponential"``: multiply by ``decay_rate`` every ``transition_steps``
      (default ``total_steps``), smoothly unless ``staircase``;
    * ``"piecewise"``: multiply by ``scales[i]`` from step ``boundaries[i]`` on.

    Examples:
        >>> from fundl.train.optim import make_schedule
        >>> lr = make_schedule(0.1, 100, name="cosine")
        >>> [round(float(lr(t)), 4) for t in (0, 50, 100)]
        [0.1, 0.05, 0.0]
        >>> lr = make_schedule(1.0, 100, name="piecewise", boundaries=[50], scales=[0.1])
        >>> [round(float(lr(t)), 4) for t in (49, 50)]
        [1.0, 0.1]
    """
    total_steps = max(int(total_steps), 1)
    if name == "constant":
        return optax.constant_schedule(learning_rate)
    if name == "cosine":
        alpha = 0.0 if isinstance(learning_rate, (int, float)) and not learning_rate else end_value / learning_rate
        return optax.cosine_decay_schedule(learning_rate, total_steps, alpha=alpha)
    if name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1), total_steps, end_value)
    if name == "exponential":
        return optax.exponential_decay(learning_rate, transition_steps or total_steps, decay_rate, staircase=staircase)
    if name == "piecewise":
        if len(boundaries) != len(scales):
            raise OptimizerError("boundaries", f"make_schedule(boundaries=..., scales=...): a piecewise schedule needs "
                                               f"one scale per boundary, got {len(boundaries)} boundaries but "
                                               f"{len(scales)} scales")
        return optax.piecewise_constant_schedule(learning_rate, dict(zip(map(int, boundaries), map(float, scales))))
    raise OptimizerError("name", f"make_schedule(name={name!r}): unknown schedule; choose one of {SCHEDULES}")


def _optax_factory(name: str):
    fn = getattr(optax, name, None)
    if fn is None or not callable(fn) or name.startswith("_"):
        raise OptimizerError("name", f"make_optimizer(name={name!r}): optax has no optimiser named {name!r} "
                                     f"(e.g. sgd, adam, adamw, rmsprop, lion)")
    return fn


def accepted_options(name: str) -> frozenset:
    """The keyword arguments of ``optax.<name>`` (e.g. whether it takes ``momentum``).

    Examples:
        >>> from fundl.train.optim import accepted_options
        >>> "momentum" in accepted_options("sgd"), "momentum" in accepted_options("adam")
        (True, False)
    """
    return frozenset(inspect.signature(_optax_factory(name)).parameters)


def matrices_only(params):
    """The weight-decay mask of nanoGPT (and GPT-2): True for parameters with >= 2 dimensions
    (weights, embeddings), False for vectors and scalars (biases, norm scales).

    Examples:
        >>> from fundl.train.optim import matrices_only
        >>> matrices_only({"w": jnp.ones((3, 4)), "b": jnp.ones(4)})
        {'b': False, 'w': True}
    """
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def decoupled_weight_decay(weight_decay: float, learning_rate, mask=None) -> optax.GradientTransformation:
    """Adds ``-lr(t) * weight_decay * params`` to the updates it receives.

    Chained after an optimiser, this is decoupled weight decay (Loshchilov &
    Hutter): the decay bypasses the optimiser's preconditioning and momentum
    and is scaled by the learning rate (a float or a schedule of the applied
    update count ``t``), as in ``optax.adamw``.  ``mask`` (as in
    ``optax.add_decayed_weights``: a tree of bools or a function of the params
    giving one) limits the decay to the leaves marked True.
    """
    decay = optax.chain(optax.set_to_zero(), optax.add_decayed_weights(weight_decay, mask),
                        optax.scale_by_learning_rate(learning_rate))

    def update(updates, state, params=None):
        extra, state = decay.update(updates, state, params)
        return jax.tree.map(jnp.add, updates, extra), state

    return optax.GradientTransformation(decay.init, update)


def make_optimizer(name: str, learning_rate, *, clip_norm: float = 0.0, weight_decay: float = 0.0,
                   accumulate_steps: int = 1, decay_mask=None, **options) -> optax.GradientTransformation:
    """Any Optax optimiser by name, e.g. ``make_optimizer("sgd", 0.1, momentum=0.9, nesterov=True)``.

    ``learning_rate`` is a float or a schedule; ``options`` go to
    ``optax.<name>`` unchanged.  ``clip_norm > 0`` clips the global gradient
    norm first.  Weight decay ``wd`` is decoupled for every optimiser,
    ``update = opt_update - lr(t) * wd * params`` (not L2 on the gradient):

    * optimisers with a ``weight_decay`` argument (adamw, lion, adamaxw,
      nadamw, ...) get it, also when it is 0 (so ``adamw`` with 0 is ``adam``
      rather than Optax's default decay);
    * the others (sgd, adam, rmsprop, ...) are chained with
      :func:`decoupled_weight_decay` after their own update.

    ``decay_mask`` (a tree of bools like the params, or a function of the
    params returning one, e.g. :func:`matrices_only`) decays only the leaves
    marked True; None decays every leaf.  Adam's betas are ``options``
    (``b1=0.9, b2=0.99``) of the optimisers that take them.

    ``accumulate_steps = k > 1`` wraps it all in ``optax.MultiSteps``: the
    gradients of k micro-batches are averaged and applied once.

    Examples:
        >>> from fundl.train.optim import make_optimizer, make_schedule
        >>> opt = make_optimizer("adamw", 1e-3, weight_decay=1e-4, clip_norm=1.0)
        >>> opt = make_optimizer("sgd", make_schedule(0.1, 1000, name="cosine"), momentum=0.9)
        >>> make_optimizer("adam", 1e-3, momentum=0.9)
        Traceback (most recent call last):
        ...
        fundl.train.optim.OptimizerError: make_optimizer(momentum=...): optax.adam does not accept ['momentum']; ...
    """
    accepted = accepted_options(name)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise OptimizerError(unknown[0], f"make_optimizer({unknown[0]}=...): optax.{name} does not accept {unknown}; "
                                         f"it accepts {sorted(accepted)}")
    if options.get("nesterov") and "momentum" in accepted and not options.get("momentum"):
        raise OptimizerError("nesterov", f"make_optimizer(nesterov=True): optax.{name}: nesterov=True needs "
                                         f"momentum > 0 (optax would ignore it)")
    kwargs = dict(options)
    if "weight_decay" in accepted:
        kwargs["weight_decay"] = weight_decay
        if decay_mask is not None:
            if "mask" not in accepted:
                raise OptimizerError("decay_mask", f"make_optimizer(decay_mask=...): optax.{name} takes weight_decay "
                                                   f"but no mask")
            kwargs["mask"] = decay_mask
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(_optax_factory(name)(learning_rate=learning_rate, **kwargs))
    if "weight_decay" not in accepted and weight_decay:
        parts.append(decoupled_weight_decay(weight_decay, learning_rate, decay_mask))
    opt = optax.chain(*parts) if len(parts) > 1 else parts[0]
    if accumulate_steps > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=accumulate_steps)
    return opt


def set_hyperparams(opt_state, **values):
    """``opt_state`` with the injected hyper-parameters (``optax.inject_hyperparams``) set to
    ``values``, wherever the injecting state sits (e.g. inside ``apply_if_finite``)."""
    def is_injected(x):  # optax's two injecting states (stateful schedules or not) carry .hyperparams
        return isinstance(x, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))

    def set_(x):
        if not is_injected(x):
            return x
        missing = sorted(set(values) - set(x.hyperparams))
        if missing:
            raise OptimizerError(missing[0], f"set_hyperparams: {missing} are not injected "
                                             f"(injected: {sorted(x.hyperparams)})")
        hp = {k: jnp.asarray(values[k], v.dtype) if k in values else v for k, v in x.hyperparams.items()}
        return x._replace(hyperparams=hp)

    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_injected) if is_injected(x)]
    if not found:
        raise OptimizerError("opt_state", "set_hyperparams: the optimiser state has no optax.inject_hyperparams "
                                          "state; build the optimiser with optax.inject_hyperparams (a config's "
                                          "sweep does: fundl.run.optimizer.optimizer_from_config(..., inject=...))")
    return jax.tree.map(set_, opt_state, is_leaf=is_injected)
