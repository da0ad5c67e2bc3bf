"""Combinators: layers made of layers (``serial``, ``parallel``, ``residual``) and ``named``.

Each child gets its own key (``fold_in(key, index)``) and keeps its params and
state under its name; :mod:`fundl.nn.children` says how, for every combinator
alike.

Examples:
    >>> model = nn.serial(nn.dense(8), nn.relu, nn.residual(nn.dense(8), nn.relu), nn.dense(2))
    >>> params, state, out_shape = model.init(jax.random.key(0), (1, 4))
    >>> sorted(params), out_shape
    (['dense_0', 'dense_1', 'residual_0'], (1, 2))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fundl.nn.children import apply_child, check_children, child_key, child_names, init_child, put_nonempty
from fundl.nn.core import Layer, ShapeError, format_shape

__all__ = ["serial", "named", "parallel", "residual"]


def _init_children(key, layers, names, input_shapes):
    """Init each child on its input shape; yields (name, params, state, shape)."""
    for i, (layer, name, shape) in enumerate(zip(layers, names, input_shapes)):
        yield (name, *init_child(layer, name, jax.random.fold_in(key, i), shape))


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
    names = child_names(layers)

    def init(key, input_shape):
        params, state, shape = {}, {}, input_shape
        for i, (layer, child) in enumerate(zip(layers, names)):
            (_, p, s, shape), = _init_children(
                jax.random.fold_in(key, i), [layer], [child], [shape]
            )
            put_nonempty(params, child, p)
            put_nonempty(state, child, s)
        return params, state, shape

    def apply(params, state, x, *, key=None, train=False):
        check_children(params, names, "params")
        check_children(state, names, "state")
        new_state = {}
        for i, (layer, child) in enumerate(zip(layers, names)):
            x, s = apply_child(layer, child, params, state, x, child_key(key, i), train)
            put_nonempty(new_state, child, s)
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
    names = child_names(layers)

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
            put_nonempty(params, child, p)
            put_nonempty(state, child, s)
            shapes.append(out)
        return params, state, merge_shapes(shapes)

    def apply(params, state, x, *, key=None, train=False):
        check_children(params, names, "params")
        check_children(state, names, "state")
        new_state, ys = {}, []
        for i, (layer, child) in enumerate(zip(layers, names)):
            y, s = apply_child(layer, child, params, state, x, child_key(key, i), train)
            put_nonempty(new_state, child, s)
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
                f"residual branch must keep the input shape {format_shape(input_shape)}, "
                f"but it produces {format_shape(out)}"
            )
        return params, state, tuple(input_shape)

    def apply(params, state, x, *, key=None, train=False):
        y, new_state = body.apply(params, state, x, key=key, train=train)
        return x + y, new_state

    return Layer(init, apply, name)
