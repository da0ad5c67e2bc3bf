"""Optax optimisers and learning-rate schedules built from plain settings.

``make_schedule`` and ``make_optimizer`` take keyword settings (as they
appear in a config's ``[schedule]`` and ``[optimizer]`` sections) and return
ordinary Optax objects; anything Optax offers can also be passed directly
to the training step instead.
"""

import inspect

import optax

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


def _optax_factory(name: str):
    fn = getattr(optax, name, None)
    if fn is None or not callable(fn) or name.startswith("_"):
        raise ValueError(f"optax has no optimiser named {name!r} (e.g. sgd, adam, adamw, rmsprop, lion)")
    return fn


def make_optimizer(name: str, learning_rate, *, clip_norm: float = 0.0, weight_decay: float = 0.0,
                   accumulate_steps: int = 1, **options) -> optax.GradientTransformation:
    """Any Optax optimiser by name, e.g. ``make_optimizer("sgd", 0.1, momentum=0.9, nesterov=True)``.

    ``learning_rate`` is a float or a schedule.  ``clip_norm > 0`` clips the
    global gradient norm first.  ``weight_decay`` goes to optimisers that take
    it (adamw, lion, ...) and is added as decoupled ``add_decayed_weights``
    before the optimiser's scaling for those that don't.  ``accumulate_steps
    = k > 1`` wraps it in ``optax.MultiSteps``: gradients of k consecutive
    micro-batches are averaged and applied once.
    """
    factory = _optax_factory(name)
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"optax.{name} does not accept {unknown}; it accepts {sorted(accepted)}")
    kwargs = dict(options)
    decay_inside = weight_decay and "weight_decay" in accepted
    if decay_inside:
        kwargs["weight_decay"] = weight_decay
    opt = factory(learning_rate=learning_rate, **kwargs)
    parts = []
    if clip_norm:
        parts.append(optax.clip_by_global_norm(clip_norm))
    if weight_decay and not decay_inside:
        # Added to the gradient, so it is scaled by the learning rate (L2-style for sgd).
        parts.append(optax.add_decayed_weights(weight_decay))
    opt = optax.chain(*parts, opt) if parts else opt
    if accumulate_steps > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=accumulate_steps)
    return opt


def optimizer_from_config(config: dict, total_steps: int) -> optax.GradientTransformation:
    """The optimiser a config's ``[optimizer]``, ``[schedule]`` and ``training.nan_policy`` describe."""
    o, s = config["optimizer"], config["schedule"]
    lr = make_schedule(o["learning_rate"], total_steps, name=s["name"], warmup_steps=s["warmup_steps"],
                       end_value=s["end_value"], decay_rate=s["decay_rate"],
                       transition_steps=s["transition_steps"], boundaries=s["boundaries"], scales=s["scales"])
    extra = {}
    if o["name"] in ("sgd", "rmsprop") and o["momentum"]:
        extra["momentum"] = o["momentum"]
    if o["name"] == "sgd" and o["nesterov"]:
        extra["nesterov"] = True
    opt = make_optimizer(o["name"], lr, clip_norm=o["clip_norm"], weight_decay=o["weight_decay"],
                         accumulate_steps=o["accumulate_steps"], **extra)
    if config["training"]["nan_policy"] == "skip":
        # A non-finite gradient leaves params and optimiser state untouched and is counted.
        opt = optax.apply_if_finite(opt, max_consecutive_errors=1_000_000)
    return opt
