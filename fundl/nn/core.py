"""The layer contract: :class:`Layer`, its errors, and the checks layers share.

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

The combinators that compose layers are in ``fundl.nn.combinators``; how they
treat their children (names, keys, error paths) in ``fundl.nn.children``.
"""

from __future__ import annotations

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
    * ``decoder``: None, or a :class:`fundl.nn.decoding.Decoder` for layers that
      generate one position at a time with a cache (attention, GPT, the char LM).

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
    # Incremental decoding with a cache (fundl.nn.decoding); None for layers that have none.
    decoder: Any = None


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


# --------------------------------------------------------------------------
# Checks that layers share.


def format_shape(shape) -> str:
    """``shape`` as error messages show it: ``(2, 5)``, with ``*`` for a ``None`` (any size)."""
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
            f"expected {what} of shape {format_shape(expected)} (rank {len(expected)}), "
            f"got shape {format_shape(shape)} (rank {len(shape)})"
        )


def check_last_dim(x, size: int, what: str = "input") -> None:
    """Raise ShapeError unless ``x`` has rank >= 1 and last dimension ``size``."""
    shape = tuple(jnp.shape(x))
    if len(shape) < 1 or shape[-1] != size:
        raise ShapeError(
            f"expected {what} of shape (..., {size}), got shape {format_shape(shape)}"
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
# Layers from plain functions, and init run abstractly.


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
