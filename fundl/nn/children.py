"""How a layer that holds other layers (a combinator) treats its children.

Every combinator (``serial``, ``parallel``, ``remat_serial``, ``bidirectional``,
``stacked``, ...) names its children, gives each its own key, keeps each
child's params and state under its name, checks that a params tree holds no
stranger, and reports an error inside a child with the child's path.  These
functions do each of those once, so every combinator behaves alike.  They are
for writing layers; models need none of them.

Examples:
    >>> layers = [nn.dense(4), nn.relu, nn.dense(2)]
    >>> child_names(layers)
    ['dense_0', 'relu_0', 'dense_1']
"""

from __future__ import annotations

import contextlib
import threading
from typing import Sequence

import jax

from fundl.nn.core import Layer, LayerError, ParamsError

__all__ = [
    "child_names", "child_key", "check_children", "init_child", "apply_child", "put_nonempty", "record_shapes",
]


def child_names(layers: Sequence[Layer]) -> list[str]:
    """The names a combinator files its children under: ``<layer name>_<k>``, ``k``
    counting per name (``dense_0``, ``relu_0``, ``dense_1``), or the name as is for a
    layer made by :func:`fundl.nn.named`.  Raises TypeError for a non-Layer and
    ValueError for two children of one name."""
    counts: dict[str, int] = {}
    names = []
    for layer in layers:
        if not isinstance(layer, Layer):
            raise TypeError(
                f"expected a fundl Layer, got {type(layer).__name__}: {layer!r}. "
                "Layers are built by calling a constructor, e.g. nn.dense(10) "
                "or nn.relu (activations are Layers themselves)."
            )
        if layer.auto_name:
            k = counts.get(layer.name, 0)
            counts[layer.name] = k + 1
            names.append(f"{layer.name}_{k}")
        else:
            names.append(layer.name)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"two children share the name(s) {dup}; rename with nn.named")
    return names


def child_key(key, index: int):
    """Child ``index``'s PRNG key, ``fold_in(key, index)``; None when ``key`` is None."""
    return None if key is None else jax.random.fold_in(key, index)


def check_children(tree: dict, names: Sequence[str], kind: str) -> None:
    """Raise ParamsError unless ``tree`` (the ``kind``, "params" or "state") is a dict
    whose entries are all among the children ``names`` (a child without arrays may be
    missing: see :func:`put_nonempty`)."""
    if not isinstance(tree, dict):
        raise ParamsError(f"expected {kind} to be a dict, got {type(tree).__name__}")
    extra = sorted(set(tree) - set(names))
    if extra:
        raise ParamsError(
            f"unexpected {kind} entries {extra}; this layer's children are {list(names)}"
        )


class _ShapeRecorder(threading.local):
    """While active, :func:`init_child` records (layer path, output shape)."""

    def __init__(self):
        self.rows: list | None = None
        self.stack: list[str] = []


_RECORDER = _ShapeRecorder()


@contextlib.contextmanager
def record_shapes():
    """Collect ``(path, output_shape)`` for every child inited inside the block
    (in execution order); used by :func:`fundl.nn.summary.summary`."""
    saved = (_RECORDER.rows, _RECORDER.stack)
    _RECORDER.rows, _RECORDER.stack = [], []
    try:
        yield _RECORDER.rows
    finally:
        _RECORDER.rows, _RECORDER.stack = saved


def init_child(layer: Layer, name: str, key, input_shape):
    """``layer.init(key, input_shape)`` as child ``name``: an error inside names the
    path (:meth:`~fundl.nn.LayerError.within`), and :func:`record_shapes` sees it."""
    _RECORDER.stack.append(name)
    try:
        p, s, out = layer.init(key, input_shape)
    except LayerError as e:
        raise e.within(name) from None
    finally:
        path = "/".join(_RECORDER.stack)
        _RECORDER.stack.pop()
    if _RECORDER.rows is not None:
        _RECORDER.rows.append((path, out))
    return p, s, out


def apply_child(layer: Layer, name: str, params: dict, state: dict, x, key, train: bool):
    """``layer.apply`` on child ``name``'s entries of ``params`` and ``state`` (``{}``
    where it has none); an error inside names the path."""
    try:
        return layer.apply(
            params.get(name, {}), state.get(name, {}), x, key=key, train=train
        )
    except LayerError as e:
        raise e.within(name) from None


def put_nonempty(tree: dict, name: str, value) -> None:
    """``tree[name] = value`` unless ``value`` is empty: a params or state tree shows
    only the children that hold arrays."""
    if value:
        tree[name] = value
