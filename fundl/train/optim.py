"""Optax optimisers and learning-rate schedules built from plain settings.

``make_schedule`` and ``make_optimizer`` take keyword settings (as they
appear in a config's ``[schedule]`` and ``[optimizer]`` sections) and return
ordinary Optax objects; anything Optax offers can also be passed directly
to the training step instead.  ``optimizer_from_config`` accepts the names in
``OPTIMIZERS`` (see docs/optimizers.md).
"""

import inspect

import jax
import jax.numpy as jnp
import optax

from fundl.config import ConfigError

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
            raise ValueError(f"piecewise schedule: {len(boundaries)} boundaries but {len(scales)} scales")
        return optax.piecewise_constant_schedule(learning_rate, dict(zip(map(int, boundaries), map(float, scales))))
    raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")


# The optimisers a config may name: each is tested against a direct optax call
# with every [optimizer] setting (tests/test_optim.py).  make_optimizer takes
# any optax optimiser; this list is what the config promises to get right.
OPTIMIZERS = ("sgd", "adam", "adamw", "nadam", "nadamw", "adamax", "adamaxw", "amsgrad",
              "adabelief", "radam", "yogi", "rmsprop", "adagrad", "lion")
"""The optimiser names a config may use (``optimizer.name``), each tested against Optax."""


def _optax_factory(name: str):
    fn = getattr(optax, name, None)
    if fn is None or not callable(fn) or name.startswith("_"):
        raise ValueError(f"optax has no optimiser named {name!r} (e.g. sgd, adam, adamw, rmsprop, lion)")
    return fn


def _takes(name: str) -> frozenset:
    """The keyword arguments of ``optax.<name>``."""
    return frozenset(inspect.signature(_optax_factory(name)).parameters)


def decoupled_weight_decay(weight_decay: float, learning_rate) -> optax.GradientTransformation:
    """Adds ``-lr(t) * weight_decay * params`` to the updates it receives.

    Chained after an optimiser, this is decoupled weight decay (Loshchilov &
    Hutter): the decay bypasses the optimiser's preconditioning and momentum
    and is scaled by the learning rate (a float or a schedule of the applied
    update count ``t``), as in ``optax.adamw``.
    """
    decay = optax.chain(optax.set_to_zero(), optax.add_decayed_weights(weight_decay),
                        optax.scale_by_learning_rate(learning_rate))

    def update(updates, state, params=None):
        extra, state = decay.update(updates, state, params)
        return jax.tree.map(jnp.add, updates, extra), state

    return optax.GradientTransformation(decay.init, update)


def make_optimizer(name: str, learning_rate, *, clip_norm: float = 0.0, weight_decay: float = 0.0,
                   accumulate_steps: int = 1, **options) -> optax.GradientTransformation:
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

    ``accumulate_steps = k > 1`` wraps it all in ``optax.MultiSteps``: the
    gradients of k micro-batches are averaged and applied once.

    Examples:
        >>> from fundl.train.optim import make_optimizer, make_schedule
        >>> opt = make_optimizer("adamw", 1e-3, weight_decay=1e-4, clip_norm=1.0)
        >>> opt = make_optimizer("sgd", make_schedule(0.1, 1000, name="cosine"), momentum=0.9)
        >>> make_optimizer("adam", 1e-3, momentum=0.9)
        Traceback (most recent call last):
        ...
        ValueError: optax.adam does not accept ['momentum']; it accepts [...]
    """
    accepted = _takes(name)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"optax.{name} does not accept {unknown}; it accepts {sorted(accepted)}")
    if options.get("nesterov") and "momentum" in accepted and not options.get("momentum"):
        raise ValueError(f"optax.{name}: nesterov=True needs momentum > 0 (optax would ignore it)")
    kwargs = dict(options)
    if "weight_decay" in accepted:
        kwargs["weight_decay"] = weight_decay
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(_optax_factory(name)(learning_rate=learning_rate, **kwargs))
    if "weight_decay" not in accepted and weight_decay:
        parts.append(decoupled_weight_decay(weight_decay, learning_rate))
    opt = optax.chain(*parts) if len(parts) > 1 else parts[0]
    if accumulate_steps > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=accumulate_steps)
    return opt


def _momentum_options(o: dict) -> dict:
    """``optimizer.momentum`` / ``nesterov`` as ``optax.<name>`` keywords; set but unused is an error."""
    name, options = o["name"], {}
    for key in ("momentum", "nesterov"):
        value = o[key]
        if not value:  # 0.0 / false: not set
            continue
        if key not in _takes(name):
            hint = " (it takes b1 for its first moment)" if key == "momentum" and "b1" in _takes(name) else ""
            takers = [n for n in OPTIMIZERS if key in _takes(n)]
            shown = str(value).lower() if isinstance(value, bool) else value
            raise ConfigError(f"optimizer.{key}={shown} is not used by optax.{name}{hint}; "
                              f"optimisers that take {key}: {', '.join(takers)}")
        options[key] = value
    if o["nesterov"] and "momentum" in _takes(name) and not o["momentum"]:
        raise ConfigError(f"optimizer.nesterov=true needs optimizer.momentum > 0 for optax.{name} "
                          "(with no momentum optax ignores nesterov); set e.g. optimizer.momentum=0.9")
    return options


def schedule_from_config(config: dict, total_steps: int, *, learning_rate=None) -> optax.Schedule:
    """The learning-rate schedule ``step -> lr`` of a config's ``optimizer.learning_rate`` and ``[schedule]``
    (``learning_rate``: another peak value, e.g. a traced one of a sweep)."""
    o, s = config["optimizer"], config["schedule"]
    learning_rate = o["learning_rate"] if learning_rate is None else learning_rate
    if s["name"] == "warmup_cosine" and s["warmup_steps"] >= total_steps:
        raise ConfigError(f"schedule.warmup_steps={s['warmup_steps']} must be smaller than the run's "
                          f"{total_steps} steps (training.steps/epochs): the cosine decay would have no steps left")
    return make_schedule(learning_rate, total_steps, name=s["name"], warmup_steps=s["warmup_steps"],
                         end_value=s["end_value"], decay_rate=s["decay_rate"],
                         transition_steps=s["transition_steps"], boundaries=s["boundaries"], scales=s["scales"])


def injectable(config: dict) -> tuple[str, ...]:
    """The ``[optimizer]`` settings that can be arrays in the optimiser state for this config
    (``optimizer_from_config(inject=...)``): the learning rate always, the weight decay where the
    optimiser takes it itself (adamw, lion, ...; the others add decay only when it is non-zero)."""
    takes_decay = config["optimizer"]["name"] in OPTIMIZERS and "weight_decay" in _takes(config["optimizer"]["name"])
    return ("learning_rate", "weight_decay") if takes_decay else ("learning_rate",)


def optimizer_from_config(config: dict, total_steps: int, *, inject: tuple[str, ...] = ()) -> optax.GradientTransformation:
    """The optimiser a config's ``[optimizer]``, ``[schedule]`` and ``training.nan_policy`` describe.

    ``optimizer.name`` must be one of OPTIMIZERS.  Every setting reaches optax
    or is a ConfigError naming it: momentum and nesterov go to optimisers that
    take them (sgd, rmsprop; nesterov also to the adam family) and are errors
    elsewhere; weight decay is as in :func:`make_optimizer`.

    ``inject``: ``[optimizer]`` keys (of :func:`injectable`) kept as arrays in
    the optimiser state (``optax.inject_hyperparams``) instead of constants,
    so that members of a vmapped sweep can hold different values
    (:func:`set_hyperparams`); the schedule then scales the injected rate.
    """
    o = config["optimizer"]
    if o["name"] not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name={o['name']!r} is not one of fundl's optimisers {list(OPTIMIZERS)}; "
                          "other optax optimisers can be passed to the training step directly")
    bad = sorted(set(inject) - set(injectable(config)))
    if bad:
        raise ValueError(f"cannot inject {bad} for optax.{o['name']}; injectable: {list(injectable(config))}")

    def build(learning_rate=o["learning_rate"], weight_decay=o["weight_decay"]):
        return make_optimizer(o["name"], schedule_from_config(config, total_steps, learning_rate=learning_rate),
                              clip_norm=o["clip_norm"], weight_decay=weight_decay,
                              accumulate_steps=o["accumulate_steps"], **_momentum_options(o))

    static = tuple(k for k in ("learning_rate", "weight_decay") if k not in inject)  # defaults would be injected too
    opt = optax.inject_hyperparams(build, static_args=static)(**{k: o[k] for k in inject}) if inject else build()
    if config["training"]["nan_policy"] == "skip":
        # A non-finite gradient leaves params and optimiser state untouched and is counted.
        opt = optax.apply_if_finite(opt, max_consecutive_errors=1_000_000)
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
            raise ValueError(f"set_hyperparams: {missing} are not injected (injected: {sorted(x.hyperparams)})")
        hp = {k: jnp.asarray(values[k], v.dtype) if k in values else v for k, v in x.hyperparams.items()}
        return x._replace(hyperparams=hp)

    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_injected) if is_injected(x)]
    if not found:
        raise ValueError("set_hyperparams: the optimiser state has no optax.inject_hyperparams state; build the "
                         "optimiser with optimizer_from_config(..., inject=(...)) or optax.inject_hyperparams")
    return jax.tree.map(set_, opt_state, is_leaf=is_injected)
