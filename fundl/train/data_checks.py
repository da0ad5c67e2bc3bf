"""What ``fit`` and ``evaluate`` check of their data before the first step: once per dataset.

The number of classes comes from the model's output: the steps of
``make_train_step`` / ``make_eval_step`` (and the ensemble's and DP-SGD's)
carry their model as ``step.model``, and its output shape is found by tracing
``model.init`` abstractly (``jax.eval_shape``: nothing is computed).  A step
without a model (one written by hand) gets the checks that need no classes:
labels >= 0 and finite inputs.  The checks themselves are
``fundl.data.checks.check_examples``.
"""

from __future__ import annotations

import functools

import jax

from fundl.data.checks import LABELS, check_examples


def step_model(fn):
    """The model a step was made for (``fn.model``), looking through wrappers that keep the
    step as ``fn`` or ``__wrapped__`` (a placement's compiled step); None when there is none."""
    for _ in range(8):
        model = getattr(fn, "model", None)
        if model is not None:
            return model
        fn = getattr(fn, "fn", None) or getattr(fn, "__wrapped__", None)
        if fn is None:
            return None
    return None


@functools.lru_cache(maxsize=32)
def model_classes(model, input_shape: tuple) -> int | None:
    """The size of the last axis of ``model``'s output for one example of ``input_shape`` (the
    classes of a classifier), found without computing anything; None if the output is not one array."""
    found = {}

    def init(key):
        params, state, out_shape = model.init(key, (1,) + tuple(input_shape))
        found["shape"] = out_shape
        return params

    jax.eval_shape(init, jax.random.key(0))
    shape = found.get("shape")
    if isinstance(shape, tuple) and shape and all(isinstance(d, int) for d in shape):
        return shape[-1]
    return None


def classes_for(step, arrays) -> int | None:
    """The classes ``step``'s model predicts for inputs like ``arrays["x"]`` (None: unknown)."""
    model = step_model(step)
    x = arrays.get("x")
    if model is None or x is None:
        return None
    try:
        return model_classes(model, tuple(x.shape[1:]))
    except TypeError:  # an unhashable model: traced every time
        return model_classes.__wrapped__(model, tuple(x.shape[1:]))


def check_split(arrays, step, what: str) -> None:
    """Check a split (``{"x": ..., "y": ...}``) for ``step``: labels within the model's classes, finite inputs."""
    check_examples(arrays, classes_for(step, arrays) if LABELS in arrays else None, what=what)


def loader_splits(loader) -> list:
    """The arrays a training loader draws from: ``loader.arrays``, or each member loader's
    (an ensemble's ``MemberLoaders``); [] for a loader that shows neither."""
    if getattr(loader, "arrays", None) is not None:
        return [loader.arrays]
    return [ld.arrays for ld in getattr(loader, "loaders", ()) if getattr(ld, "arrays", None) is not None]
