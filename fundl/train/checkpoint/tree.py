"""A train state as Orbax stores it: a nested dict keyed by tree path, typed PRNG keys as key data.

Saving flattens any pytree (TrainState, ensembles, plain dicts) to
``{"params/dense_0/w": leaf}`` and nests it by path for Orbax; restoring
fills a template of the same structure, so Optax's NamedTuples and typed keys
come back as the template has them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fundl.train.state import is_prng_key


def path_str(path) -> str:
    """A tree path as the manifest writes it: ``params/dense_0/w``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def leaf_data(leaf):
    """What is stored for a leaf: typed PRNG keys as their key data; jax.Arrays as they are
    (any sharding, possibly not fully addressable); anything else as NumPy."""
    if is_prng_key(leaf):
        return jax.random.key_data(leaf)
    return leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)


def stored_leaves(state) -> list[tuple[str, Any]]:
    """``[(tree path, stored leaf)]`` of ``state``, in tree order."""
    return [(path_str(p), leaf_data(x)) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]]


def flatten_state(state) -> dict[str, np.ndarray]:
    """``{tree path: numpy array}``; typed PRNG keys become their key data."""
    return {p: np.asarray(jax.device_get(x)) for p, x in stored_leaves(state)}


def shape_dtype(x) -> tuple[tuple, str]:
    return tuple(x.shape), str(np.dtype(x.dtype))


def nest(flat: dict[str, Any]) -> dict:
    """``{"params/dense_0/w": x}`` -> ``{"params": {"dense_0": {"w": x}}}`` (Orbax's tree)."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, name = path.split("/") if path else ["_"]
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = value
    return tree


def unnest(tree: dict, paths) -> list:
    """The leaves of a nested ``tree`` at ``paths`` (the inverse of :func:`nest`)."""
    out = []
    for path in paths:
        node = tree
        for p in (path.split("/") if path else ["_"]):
            node = node[p]
        out.append(node)
    return out


def key_impl(leaf):
    """The PRNG implementation of a typed key leaf (an array or a ShapeDtypeStruct of key dtype)."""
    try:
        return jax.random.key_impl(leaf)
    except TypeError:
        return leaf.dtype._impl  # a ShapeDtypeStruct: its key dtype carries the implementation


def template_leaves(template) -> tuple[list, Any, dict]:
    """The template's ``(path, leaf)`` list, treedef, and ``{path: (shape, dtype)}`` of what is stored."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    expected = {}
    for p, leaf in leaves:
        if is_prng_key(leaf):
            data = jax.eval_shape(jax.random.key_data, leaf)
            expected[path_str(p)] = (tuple(data.shape), str(np.dtype(data.dtype)))
        elif isinstance(leaf, jax.ShapeDtypeStruct):
            expected[path_str(p)] = (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
        else:
            expected[path_str(p)] = (tuple(np.shape(leaf)), str(jnp.result_type(leaf)))
    return [(path_str(p), leaf) for p, leaf in leaves], treedef, expected


def target_sharding(leaf):
    """Where a restored leaf goes: the template leaf's sharding, else this process's first device."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if is_prng_key(leaf) and isinstance(leaf, jax.Array):
        return jax.random.key_data(leaf).sharding
    return sharding  # key data: a NamedSharding's spec leaves the trailing key axis replicated
