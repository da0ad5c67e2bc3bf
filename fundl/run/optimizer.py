"""A config's ``[optimizer]`` and ``[schedule]`` as an Optax optimiser (docs/optimizers.md).

The library's ``make_optimizer`` / ``make_schedule`` do the work; this module
reads the config's keys, adds what the run asks (``training.nan_policy =
"skip"``, injected hyper-parameters for a sweep) and turns the library's
:class:`~fundl.train.optim.OptimizerError` into a ConfigError naming the
config key.  Rules between keys (momentum for an optimiser without it, ...)
were checked when the config was validated (``fundl.run.config.check_config``).
"""

from __future__ import annotations

import optax

from fundl.run.config import ConfigError
from fundl.run.schema import OPTIMIZERS
from fundl.train.optim import OptimizerError, accepted_options, make_optimizer, make_schedule, matrices_only

# make_optimizer / make_schedule argument -> the config key that sets it
CONFIG_KEYS = {"name": "optimizer.name", "learning_rate": "optimizer.learning_rate",
               "momentum": "optimizer.momentum", "nesterov": "optimizer.nesterov",
               "weight_decay": "optimizer.weight_decay", "clip_norm": "optimizer.clip_norm",
               "b1": "optimizer.b1", "b2": "optimizer.b2", "decay_mask": "optimizer.decay_matrices_only",
               "accumulate_steps": "optimizer.accumulate_steps", "boundaries": "schedule.boundaries",
               "scales": "schedule.scales", "warmup_steps": "schedule.warmup_steps"}


def _config_error(e: OptimizerError) -> ConfigError:
    return ConfigError(f"{CONFIG_KEYS.get(e.argument, e.argument)}: {e}")


def schedule_from_config(config: dict, total_steps: int, *, learning_rate=None) -> optax.Schedule:
    """The learning-rate schedule ``step -> lr`` of a config's ``optimizer.learning_rate`` and ``[schedule]``
    (``learning_rate``: another peak value, e.g. a traced one of a sweep)."""
    o, s = config["optimizer"], config["schedule"]
    learning_rate = o["learning_rate"] if learning_rate is None else learning_rate
    if s["name"] == "warmup_cosine" and s["warmup_steps"] >= total_steps:
        raise ConfigError(f"schedule.warmup_steps={s['warmup_steps']} must be smaller than the run's "
                          f"{total_steps} steps (training.steps/epochs): the cosine decay would have no steps left")
    try:
        return make_schedule(learning_rate, total_steps, name=s["name"], warmup_steps=s["warmup_steps"],
                             end_value=s["end_value"], decay_rate=s["decay_rate"],
                             transition_steps=s["transition_steps"], boundaries=s["boundaries"], scales=s["scales"])
    except OptimizerError as e:
        raise _config_error(e) from None


def injectable(config: dict) -> tuple[str, ...]:
    """The ``[optimizer]`` settings that can be arrays in the optimiser state for this config
    (``optimizer_from_config(inject=...)``): the learning rate always, the weight decay where the
    optimiser takes it itself (adamw, lion, ...; the others add decay only when it is non-zero)."""
    name = config["optimizer"]["name"]
    takes_decay = name in OPTIMIZERS and "weight_decay" in accepted_options(name)
    return ("learning_rate", "weight_decay") if takes_decay else ("learning_rate",)


def momentum_options(optimizer: dict) -> dict:
    """``optimizer.momentum`` / ``nesterov`` / ``b1`` / ``b2`` as ``optax.<name>`` keywords (those set:
    non-zero / true / not ``"auto"``)."""
    out = {key: optimizer[key] for key in ("momentum", "nesterov") if optimizer[key]}
    return out | {key: optimizer[key] for key in ("b1", "b2") if optimizer[key] != "auto"}


def optimizer_from_config(config: dict, total_steps: int, *, inject: tuple[str, ...] = ()) -> optax.GradientTransformation:
    """The optimiser a config's ``[optimizer]``, ``[schedule]`` and ``training.nan_policy`` describe.

    ``optimizer.name`` must be one of OPTIMIZERS.  Every setting reaches optax
    or is a ConfigError naming it: momentum and nesterov go to optimisers that
    take them (sgd, rmsprop; nesterov also to the adam family) and are errors
    elsewhere, as are ``b1`` / ``b2`` (the adam family and lion); weight decay is as in
    ``fundl.train.optim.make_optimizer``, on every leaf or (``decay_matrices_only``) on those
    with >= 2 dimensions.

    ``inject``: ``[optimizer]`` keys (of :func:`injectable`) kept as arrays in
    the optimiser state (``optax.inject_hyperparams``) instead of constants,
    so that members of a vmapped sweep can hold different values
    (``fundl.train.optim.set_hyperparams``); the schedule then scales the injected rate.
    """
    o = config["optimizer"]
    if o["name"] not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name={o['name']!r} is not one of fundl's optimisers {list(OPTIMIZERS)}; "
                          "other optax optimisers can be passed to the training step directly")
    bad = sorted(set(inject) - set(injectable(config)))
    if bad:
        raise ValueError(f"cannot inject {bad} for optax.{o['name']}; injectable: {list(injectable(config))}")

    def build(learning_rate=o["learning_rate"], weight_decay=o["weight_decay"]):
        schedule = schedule_from_config(config, total_steps, learning_rate=learning_rate)
        try:
            return make_optimizer(o["name"], schedule, clip_norm=o["clip_norm"], weight_decay=weight_decay,
                                  accumulate_steps=o["accumulate_steps"], **momentum_options(o),
                                  decay_mask=matrices_only if o["decay_matrices_only"] else None)
        except OptimizerError as e:
            raise _config_error(e) from None

    static = tuple(k for k in ("learning_rate", "weight_decay") if k not in inject)  # defaults would be injected too
    opt = optax.inject_hyperparams(build, static_args=static)(**{k: o[k] for k in inject}) if inject else build()
    if config["training"]["nan_policy"] == "skip":
        # A non-finite gradient leaves params and optimiser state untouched and is counted.
        opt = optax.apply_if_finite(opt, max_consecutive_errors=1_000_000)
    return opt
