"""The layer contract and the combinators that compose layers.

Every layer and model in fundl is a :class:`Layer`: a pair of pure functions

* ``init(key, input_shape) -> (params, state, output_shape)``
* ``apply(params, state, x, *, key=None, train=False) -> (y, new_state)``

``input_shape`` includes the batch dimension (``(batch, ...)``); ``apply``
accepts any batch size.  ``params`` and ``state`` are plain nested dicts of
arrays keyed by readable names; layers without parameters or state use ``{}``
and combinators leave such empty entries out, so a printed params tree shows
only what holds numbers.

Randomness is explicit: ``key`` is a ``jax.random`` key at call time (needed
only by layers such as dropout in training mode).  ``train`` is a Python bool
chosen at call time, never at construction.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

Params = dict
State = dict
Shape = tuple


class Layer(NamedTuple):
    """A layer: two pure functions and a default name used by combinators.

    * ``init(key, input_shape) -> (params, state, output_shape)``: ``input_shape``
      includes the batch axis; ``params`` and ``state`` are nested dicts of arrays
      (``{}`` when there are none).
    * ``apply(params, state, x, *, key=None, train=False) -> (y, new_state)``: pure;
      ``x`` may have any batch size.

    Examples:
        >>> layer = nn.dense(3)
        >>> params, state, out_shape = layer.init(jax.random.key(0), (1, 4))
        >>> jax.tree.map(jnp.shape, params), state, out_shape
        ({'b': (3,), 'w': (4, 3)}, {}, (1, 3))
        >>> y, new_state = layer.apply(params, state, jnp.ones((5, 4)))
        >>> y.shape
        (5, 3)
    """

    init: Callable[..., tuple[Params, State, Any]]
    apply: Callable[..., tuple[Any, State]]
    name: str = "layer"
    # When False, combinators use ``name`` as is instead of ``name_<k>``.
    auto_name: bool = True


# --------------------------------------------------------------------------
# Errors that name where they happened.


class LayerError(ValueError):
    """An error raised inside a layer; combinators prefix the layer path."""

    def __init__(self, message: str, path: Sequence[str] = ()):
        self.message = message
        self.path = tuple(path)
        super().__init__(self._render())

    def _render(self) -> str:
        where = "/".join(self.path) if self.path else "<top>"
        return f"at layer '{where}': {self.message}"

    def within(self, name: str) -> "LayerError":
        """The same error one level further out, at ``name``."""
        return type(self)(self.message, (name,) + self.path)


class ShapeError(LayerError):
    """An input whose shape or rank does not fit the layer.

    Examples:
        >>> model = nn.serial(nn.named("encoder", nn.serial(nn.dense(8))))
        >>> params, state, _ = model.init(jax.random.key(0), (1, 4))
        >>> model.apply(params, state, jnp.ones((2, 5)))
        Traceback (most recent call last):
        ...
        fundl.nn.core.ShapeError: at layer 'encoder/dense_0': expected input of shape (..., 4), got shape (2, 5)
    """


class ParamsError(LayerError):
    """Params or state whose structure does not fit the layer."""


class KeyMissingError(LayerError):
    """A layer needs a PRNG key (e.g. dropout in training) and got none."""


def _fmt(shape) -> str:
    return "(" + ", ".join("*" if d is None else str(d) for d in shape) + ")"


def check_input(x, expected: Sequence[int | None], what: str = "input") -> None:
    """Raise ShapeError unless ``x.shape`` matches ``expected``.

    ``None`` in ``expected`` matches any size; a leading ``...`` is not
    supported on purpose: layers state the rank they accept.
    """
    shape = tuple(jnp.shape(x))
    ok = len(shape) == len(expected) and all(
        e is None or e == s for e, s in zip(expected, shape)
    )
    if not ok:
        raise ShapeError(
            f"expected {what} of shape {_fmt(expected)} (rank {len(expected)}), "
            f"got shape {_fmt(shape)} (rank {len(shape)})"
        )


def check_last_dim(x, size: int, what: str = "input") -> None:
    """Raise ShapeError unless ``x`` has rank >= 1 and last dimension ``size``."""
    shape = tuple(jnp.shape(x))
    if len(shape) < 1 or shape[-1] != size:
        raise ShapeError(
            f"expected {what} of shape (..., {size}), got shape {_fmt(shape)}"
        )


def get_param(tree: dict, name: str, kind: str = "params"):
    """``tree[name]`` or a ParamsError that lists what the layer expected."""
    if not isinstance(tree, dict):
        raise ParamsError(f"expected {kind} to be a dict, got {type(tree).__name__}")
    try:
        return tree[name]
    except KeyError:
        raise ParamsError(
            f"missing {kind} entry '{name}'; got keys {sorted(tree)}"
        ) from None


# --------------------------------------------------------------------------
# Combinators.


def _child_names(layers: Sequence[Layer]) -> list[str]:
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


def _child_key(key, i: int):
    return None if key is None else jax.random.fold_in(key, i)


def _check_keys(tree: dict, names: Sequence[str], kind: str) -> None:
    if not isinstance(tree, dict):
        raise ParamsError(f"expected {kind} to be a dict, got {type(tree).__name__}")
    extra = sorted(set(tree) - set(names))
    if extra:
        raise ParamsError(
            f"unexpected {kind} entries {extra}; this layer's children are {list(names)}"
        )


class _ShapeRecorder(threading.local):
    """While active, combinators record (layer path, output shape) at init."""

    def __init__(self):
        self.rows: list | None = None
        self.stack: list[str] = []


_RECORDER = _ShapeRecorder()


@contextlib.contextmanager
def record_shapes():
    """Collect ``(path, output_shape)`` for every child inited inside the block
    (in execution order); used by :func:`fundl.nn.summary`."""
    saved = (_RECORDER.rows, _RECORDER.stack)
    _RECORDER.rows, _RECORDER.stack = [], []
    try:
        yield _RECORDER.rows
    finally:
        _RECORDER.rows, _RECORDER.stack = saved


def _init_child(layer, name, key, input_shape):
    """``layer.init`` as child ``name``: errors name the path, and ``nn.summary`` records it."""
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


def _init_children(key, layers, names, input_shapes):
    """Init each child on its input shape; yields (name, params, state, shape)."""
    for i, (layer, name, shape) in enumerate(zip(layers, names, input_shapes)):
        yield (name, *_init_child(layer, name, jax.random.fold_in(key, i), shape))


def _apply_child(layer, name, params, state, x, key, train):
    try:
        return layer.apply(
            params.get(name, {}), state.get(name, {}), x, key=key, train=train
        )
    except LayerError as e:
        raise e.within(name) from None


def _put(tree: dict, name: str, value) -> None:
    if value:  # leave empty dicts out: the tree shows only what holds arrays
        tree[name] = value


def serial(*layers: Layer, name: str = "serial") -> Layer:
    """Compose layers in sequence: ``serial(f, g)(x) = g(f(x))``.

    Children are named ``<layer name>_<k>`` with ``k`` counting per layer
    kind (``dense_0``, ``relu_0``, ``dense_1``); wrap a child in
    :func:`named` to choose its name.  Each child gets its own key
    (``fold_in(key, index)``) at ``init`` and ``apply``.

    Examples:
        >>> model = nn.serial(nn.dense(8), nn.relu, nn.dense(2))
        >>> params, state, out_shape = model.init(jax.random.key(0), (1, 4))
        >>> sorted(params), out_shape
        (['dense_0', 'dense_1'], (1, 2))
        >>> model.apply(params, state, jnp.ones((3, 4)))[0].shape
        (3, 2)
    """
    names = _child_names(layers)

    def init(key, input_shape):
        params, state, shape = {}, {}, input_shape
        for i, (layer, child) in enumerate(zip(layers, names)):
            (_, p, s, shape), = _init_children(
                jax.random.fold_in(key, i), [layer], [child], [shape]
            )
            _put(params, child, p)
            _put(state, child, s)
        return params, state, shape

    def apply(params, state, x, *, key=None, train=False):
        _check_keys(params, names, "params")
        _check_keys(state, names, "state")
        new_state = {}
        for i, (layer, child) in enumerate(zip(layers, names)):
            x, s = _apply_child(layer, child, params, state, x, _child_key(key, i), train)
            _put(new_state, child, s)
        return x, new_state

    return Layer(init, apply, name)


def named(name: str, layer: Layer) -> Layer:
    """The same layer under a chosen name (used as is by combinators, without ``_<k>``).

    Examples:
        >>> model = nn.serial(nn.named("encoder", nn.dense(8)), nn.dense(2))
        >>> sorted(model.init(jax.random.key(0), (1, 4))[0])
        ['dense_0', 'encoder']
    """
    return layer._replace(name=name, auto_name=False)


_MERGES = ("tuple", "add", "concat")


def parallel(*layers: Layer, merge: str = "tuple", axis: int = -1, name: str = "parallel") -> Layer:
    """Apply every layer to the same input and merge the outputs.

    ``merge="tuple"`` returns a tuple of outputs, ``"add"`` their sum and
    ``"concat"`` their concatenation along ``axis``.

    Examples:
        >>> branches = nn.parallel(nn.dense(3), nn.dense(5), merge="concat")
        >>> branches.init(jax.random.key(0), (1, 4))[2]
        (1, 8)
    """
    if merge not in _MERGES:
        raise ValueError(f"merge must be one of {_MERGES}, got {merge!r}")
    names = _child_names(layers)

    def merge_shapes(shapes):
        if merge == "tuple":
            return tuple(shapes)
        if merge == "add":
            if any(s != shapes[0] for s in shapes):
                raise ShapeError(f"'add' needs equal branch output shapes, got {list(shapes)}")
            return shapes[0]
        first = list(shapes[0])
        ax = axis % len(first)
        for s in shapes[1:]:
            if len(s) != len(first) or any(a != b for i, (a, b) in enumerate(zip(s, first)) if i != ax):
                raise ShapeError(
                    f"'concat' along axis {axis} needs branch shapes equal elsewhere, got {list(shapes)}"
                )
        first[ax] = sum(s[ax] for s in shapes)
        return tuple(first)

    def init(key, input_shape):
        params, state, shapes = {}, {}, []
        for child, p, s, out in _init_children(key, layers, names, [input_shape] * len(layers)):
            _put(params, child, p)
            _put(state, child, s)
            shapes.append(out)
        return params, state, merge_shapes(shapes)

    def apply(params, state, x, *, key=None, train=False):
        _check_keys(params, names, "params")
        _check_keys(state, names, "state")
        new_state, ys = {}, []
        for i, (layer, child) in enumerate(zip(layers, names)):
            y, s = _apply_child(layer, child, params, state, x, _child_key(key, i), train)
            _put(new_state, child, s)
            ys.append(y)
        if merge == "tuple":
            return tuple(ys), new_state
        if merge == "add":
            return sum(ys[1:], ys[0]), new_state
        return jnp.concatenate(ys, axis=axis), new_state

    return Layer(init, apply, name)


def residual(*layers: Layer, name: str = "residual") -> Layer:
    """``x + serial(*layers)(x)``; the branch must keep the input's shape.

    The params are the branch's (``serial``'s children, not nested further).

    Examples:
        >>> block = nn.residual(nn.dense(4), nn.relu)
        >>> params, state, out_shape = block.init(jax.random.key(0), (1, 4))
        >>> jax.tree.map(jnp.shape, params), out_shape
        ({'dense_0': {'b': (4,), 'w': (4, 4)}}, (1, 4))
    """
    body = named("body", serial(*layers))

    def init(key, input_shape):
        params, state, out = body.init(key, input_shape)
        if tuple(out) != tuple(input_shape):
            raise ShapeError(
                f"residual branch must keep the input shape {_fmt(input_shape)}, "
                f"but it produces {_fmt(out)}"
            )
        return params, state, tuple(input_shape)

    def apply(params, state, x, *, key=None, train=False):
        y, new_state = body.apply(params, state, x, key=key, train=train)
        return x + y, new_state

    return Layer(init, apply, name)


def elementwise(fn: Callable, name: str) -> Layer:
    """A parameter-free layer applying ``fn`` to every element (the activations are built so).

    Examples:
        >>> square = nn.elementwise(jnp.square, "square")
        >>> square.apply({}, {}, jnp.array([1.0, 2.0, 3.0]))[0]
        Array([1., 4., 9.], dtype=float32)
    """

    def init(key, input_shape):
        return {}, {}, tuple(input_shape)

    def apply(params, state, x, *, key=None, train=False):
        return fn(x), {}

    return Layer(init, apply, name)


def lambda_layer(fn: Callable, name: str = "lambda") -> Layer:
    """A parameter-free layer from any shape-polymorphic function ``fn(x)``.

    The output shape is found by tracing ``fn`` with ``jax.eval_shape``.

    Examples:
        >>> mean_over_time = nn.lambda_layer(lambda x: x.mean(axis=1), "mean_over_time")
        >>> mean_over_time.init(jax.random.key(0), (1, 10, 3))[2]
        (1, 3)
    """

    def init(key, input_shape):
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
        return {}, {}, jax.tree.map(lambda s: tuple(s.shape), out)

    def apply(params, state, x, *, key=None, train=False):
        return fn(x), {}

    return Layer(init, apply, name)


def abstract_init(layer: Layer, input_shape) -> tuple[Params, State, Any]:
    """``layer.init`` run abstractly: params and state as ``ShapeDtypeStruct``s.

    Costs no FLOPs and no memory, so it serves as a shape checker, a
    parameter counter and a structure reference for any model size.

    Examples:
        >>> params, state, out_shape = nn.abstract_init(models.mlp([512], 10), (1, 784))
        >>> sum(p.size for p in jax.tree.leaves(params)), out_shape
        (407050, (1, 10))
        >>> params["dense_0"]["w"]
        ShapeDtypeStruct(shape=(784, 512), dtype=float32)
    """
    box = {}

    def run(key):
        params, state, out = layer.init(key, input_shape)
        box["out"] = out
        return params, state

    params, state = jax.eval_shape(run, jax.random.key(0))
    return params, state, box["out"]
