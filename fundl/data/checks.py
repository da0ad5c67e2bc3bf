"""Examples checked at the boundary: labels that are class ids, inputs that are finite.

Neither fails inside a compiled step: a label of -1 trains silently as the
last class, a label past the classes or a NaN input shows up later as a
"divergence", and an evaluation averages over rows it cannot score.  So a
dataset is checked once, on the host, before it is trained on or scored
(``fit``, ``evaluate``, the command line when it loads data), never per step:
:func:`check_examples` remembers the arrays it has passed.  The error names
the first bad example's index and its value.
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping

import numpy as np

from fundl.data.errors import DataError

LABELS = "y"
"""The key of a split's labels (``{"x": inputs, "y": labels}``); every other array is an input."""


class ExampleError(DataError):
    """An example that cannot be trained on or scored; ``index`` is the first bad example's
    index, ``value`` its bad value (a label, or a non-finite input value)."""

    def __init__(self, message: str, *, index, value):
        super().__init__(message)
        self.index, self.value = index, value


_passed: dict[tuple, list] = {}  # (ids of the arrays, num_classes) -> weak references to those arrays


def check_examples(arrays: Mapping[str, Any], num_classes: int | None = None, *, what: str = "the data") -> None:
    """Raise :class:`ExampleError` unless every label is an integer class id in ``[0, num_classes)``
    (``num_classes`` None: any id >= 0; float labels need only be finite) and every float input is
    finite.  ``arrays`` is a split, ``{"x": (N, ...), "y": (N, ...)}``; ``what`` names it in the
    message.  Arrays that passed once (the same objects) are not checked again.

    Examples:
        >>> from fundl.data.checks import check_examples
        >>> check_examples({"x": np.zeros((3, 2)), "y": np.array([0, 2, 1])}, 3)
        >>> check_examples({"x": np.zeros((3, 2)), "y": np.array([0, 3, 1])}, 3, what="train")
        Traceback (most recent call last):
        ...
        fundl.data.checks.ExampleError: train: 1 labels outside the class range [0, 3); the first is 3 at index 1. Labels must be integer class ids 0..2
    """
    key = tuple(sorted((k, id(v)) for k, v in arrays.items())) + (num_classes,)
    refs = _passed.get(key)
    if refs is not None and all(r() is arrays[k] for k, r in zip(sorted(arrays), refs)):
        return
    for name, values in arrays.items():
        a = np.asarray(values)
        if name == LABELS and np.issubdtype(a.dtype, np.integer):
            _check_labels(a, num_classes, what)
        elif np.issubdtype(a.dtype, np.inexact):
            _check_finite(a, name, what)
    try:
        refs = [weakref.ref(arrays[k]) for k in sorted(arrays)]
    except TypeError:  # an array type without weak references: checked again next time
        return
    for stale in [k for k, rs in _passed.items() if any(r() is None for r in rs)]:
        del _passed[stale]
    _passed[key] = refs


def _where(bad: np.ndarray):
    """The first True position of ``bad``: an int for 1-D, else a tuple (example, position in it)."""
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    return first[0] if len(first) == 1 else first


def _check_labels(y: np.ndarray, num_classes: int | None, what: str) -> None:
    bad = (y < 0) if num_classes is None else (y < 0) | (y >= num_classes)
    if not bad.any():
        return
    at = _where(bad)
    value = int(y[at])
    if num_classes is None:
        raise ExampleError(f"{what}: {int(bad.sum())} negative labels; the first is {value} at index {at}. "
                           f"Labels must be integer class ids >= 0", index=at, value=value)
    raise ExampleError(f"{what}: {int(bad.sum())} labels outside the class range [0, {num_classes}); the first is "
                       f"{value} at index {at}. Labels must be integer class ids 0..{num_classes - 1}",
                       index=at, value=value)


def _check_finite(a: np.ndarray, name: str, what: str) -> None:
    if a.size == 0 or np.isfinite(a).all():  # the usual case: one pass, no per-example reduction
        return
    rows = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1) if a.ndim else np.array([True])
    index = int(np.argmax(rows))
    row = a[index].reshape(-1) if a.ndim else a.reshape(-1)
    value = row[np.argmax(~np.isfinite(row))].item()
    kind = "labels" if name == LABELS else f"inputs ('{name}')"
    raise ExampleError(f"{what}: {int(rows.sum())} examples with non-finite {kind}; the first is example {index}, "
                       f"which holds {value}. Remove or repair those examples (inputs must be finite numbers)",
                       index=index, value=value)
