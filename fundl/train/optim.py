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


def make_schedule(learning_rate: float, total_steps: int, *, name: str = "constant",
                  warmup_steps: int = 0, end_value: float = 0.0, decay_rate: float = 0.1,
                  transition_steps: int = 0, staircase: bool = False,
                  boundaries: list | tuple = (), scales: list | tuple = ()) -> optax.Schedule:
    """A learning-rate schedule ``step -> lr``.

    constant | cosine (to ``end_value`` over ``total_steps``) | warmup_cosine
    (linear warm-up for ``warmup_steps`` then cosine) | exponential (multiply by
    ``decay_rate`` every ``transition_steps``, default ``total_steps``) |
    piecewise (multiply by ``scales[i]`` at ``boundaries[i]``).
    """
    total_steps = max(int(total_steps), 1)
    if name == "constant":
        return optax.constant_schedule(learning_rate)
    if name == "cosine":
        return optax.cosine_decay_schedule(learning_rate, total_steps, alpha=end_value / learning_rate if learning_rate else 0.0)
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
    if weight_decay and "weight_decay" not in accepted:
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


def schedule_from_config(config: dict, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule ``step -> lr`` of a config's ``optimizer.learning_rate`` and ``[schedule]``."""
    o, s = config["optimizer"], config["schedule"]
    if s["name"] == "warmup_cosine" and s["warmup_steps"] >= total_steps:
        raise ConfigError(f"schedule.warmup_steps={s['warmup_steps']} must be smaller than the run's "
                          f"{total_steps} steps (training.steps/epochs): the cosine decay would have no steps left")
    return make_schedule(o["learning_rate"], total_steps, name=s["name"], warmup_steps=s["warmup_steps"],
                         end_value=s["end_value"], decay_rate=s["decay_rate"],
                         transition_steps=s["transition_steps"], boundaries=s["boundaries"], scales=s["scales"])


def optimizer_from_config(config: dict, total_steps: int) -> optax.GradientTransformation:
    """The optimiser a config's ``[optimizer]``, ``[schedule]`` and ``training.nan_policy`` describe.

    ``optimizer.name`` must be one of OPTIMIZERS.  Every setting reaches optax
    or is a ConfigError naming it: momentum and nesterov go to optimisers that
    take them (sgd, rmsprop; nesterov also to the adam family) and are errors
    elsewhere; weight decay is as in :func:`make_optimizer`.
    """
    o = config["optimizer"]
    if o["name"] not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name={o['name']!r} is not one of fundl's optimisers {list(OPTIMIZERS)}; "
                          "other optax optimisers can be passed to the training step directly")
    opt = make_optimizer(o["name"], schedule_from_config(config, total_steps), clip_norm=o["clip_norm"], weight_decay=o["weight_decay"],
                         accumulate_steps=o["accumulate_steps"], **_momentum_options(o))
    if config["training"]["nan_policy"] == "skip":
        # A non-finite gradient leaves params and optimiser state untouched and is counted.
        opt = optax.apply_if_finite(opt, max_consecutive_errors=1_000_000)
    return opt
