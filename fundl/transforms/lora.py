"""LoRA (Hu et al. 2021): low-rank adapters on chosen parameters of a trained model.

Pure functions over plain pytrees.  A parameter ``W`` whose tree path matches
a regular expression gets an adapter ``{"a": A, "b": B}`` of rank ``r``; the
adapted model uses

    W' = W + (alpha / r) * reshape(A @ B, W.shape)

with ``A`` of shape ``(prod(W.shape[:-1]), r)`` and ``B`` of shape
``(r, W.shape[-1])`` (a dense kernel ``(in, out)`` gets ``A: (in, r)``,
``B: (r, out)``).  ``A`` starts uniform in ``±1/sqrt(in)`` (PyTorch's and
PEFT's default for a linear layer) and ``B`` at zero, so training starts from
the base model's function exactly.

* :func:`init` -- the adapters of a params tree: a nested dict with the
  params' keys down to each adapted leaf, plain arrays at the bottom.
* :func:`merge` -- ``params`` with every adapter folded in: a plain params
  tree, for the unchanged model, whose outputs are the adapted model's.
* :func:`adapt` -- the adapted model as a :class:`~fundl.nn.Layer`: its
  *params are the adapters*, and its *state* holds the frozen base params
  (``{"base": params, "model": the model's own state}``).  Anything that
  trains params therefore trains the adapters alone: ``create_train_state``
  gives an optimiser state shaped like the adapters, ``make_train_step``
  differentiates the adapters only, and the base params come back from every
  step as they went in (state a layer returns unchanged), bit for bit.  The
  rest of fundl (``fit``, checkpoints, ensembles, per-example gradients and
  DP-SGD, placements) sees an ordinary model.

Which parameters: ``targets`` is a regular expression searched
(``re.search``) in each leaf's path, the keys joined by ``/`` as
checkpoints and partition rules write them (``blocks_0/attn/qkv/w``;
no ``params/`` prefix); only leaves with two or more dimensions are adapted
(a bias or a norm scale has no low-rank update worth the name).

How the adapted model computes: it applies the unchanged model to the merged
params, so an adapted model and its merge agree exactly, and any layer's
parameters can be adapted (dense, attention, embeddings, convolutions).  The
merge costs ``O(in * out * r)`` per adapted matrix per call, small beside
the matmul on a batch of more than ``r`` rows; gradients reach ``A`` and
``B`` through the merged matrix.  The base params are cast to the adapters'
float dtype first: the train step casts the trained params (the adapters)
to its compute dtype, so the base computes in bfloat16 under
``compute_dtype="bfloat16"`` while its stored copy stays as it was.

Examples:
    >>> from fundl.transforms import lora
    >>> model = models.mlp([16], 3)
    >>> params, state, _ = model.init(jax.random.key(0), (1, 4))
    >>> adapted = lora.adapt(model, rank=2, alpha=4.0, targets="dense_0/w$")
    >>> adapters, lstate, _ = adapted.init(jax.random.key(1), (1, 4))
    >>> jax.tree.map(jnp.shape, adapters)
    {'dense_0': {'w': {'a': (4, 2), 'b': (2, 16)}}}
    >>> lstate = lora.set_base(lstate, params)           # the trained params, frozen
    >>> x = jnp.ones((5, 4))
    >>> y, _ = adapted.apply(adapters, lstate, x)
    >>> bool(jnp.all(y == model.apply(lora.merge(params, adapters, alpha=4.0), state, x)[0]))
    True
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from fundl.nn.core import Layer


class LoRAError(ValueError):
    """A LoRA setting that cannot work: a ``targets`` pattern that is not a regular expression or
    adapts nothing, a rank below 1, adapters or base params that do not fit the model's params."""


def leaf_path(path) -> str:
    """A tree path as LoRA's ``targets`` see it: ``dense_0/w`` (keys joined by ``/``)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _compile(targets: str):
    try:
        return re.compile(targets)
    except (re.error, TypeError) as e:
        raise LoRAError(f"lora targets {targets!r} is not a regular expression ({e})") from None


def target_paths(params, targets: str) -> list[str]:
    """The paths of the leaves of ``params`` that ``targets`` adapts (>= 2-D leaves whose path it
    matches), in tree order.  A pattern that adapts nothing is a :class:`LoRAError` listing the
    candidates.

    Examples:
        >>> from fundl.transforms import lora
        >>> params = {"dense_0": {"w": jnp.ones((4, 8)), "b": jnp.ones(8)}, "dense_1": {"w": jnp.ones((8, 2))}}
        >>> lora.target_paths(params, "dense")
        ['dense_0/w', 'dense_1/w']
    """
    regex = _compile(targets)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    matrices = [leaf_path(p) for p, x in leaves if jnp.ndim(x) >= 2]
    found = [p for p in matrices if regex.search(p)]
    if not found:
        raise LoRAError(f"lora targets {targets!r} matches none of the model's parameters with >= 2 dimensions "
                        f"(searched in their paths: {matrices})")
    return found


def _matrix_shape(shape) -> tuple[int, int]:
    return math.prod(shape[:-1]), shape[-1]


def _put(tree: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _get(tree, keys: list[str]):
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _keys(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def init(key, params, *, rank: int, targets: str):
    """The adapters of ``params``: for each leaf :func:`target_paths` names, ``{"a": A, "b": B}``
    (``A`` uniform in ``±1/sqrt(in)``, ``B`` zero), nested under the leaf's keys.  ``params`` may
    hold arrays or ``jax.ShapeDtypeStruct`` s; the adapters take each leaf's dtype."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise LoRAError(f"lora rank must be an int >= 1, got {rank!r}")
    chosen = set(target_paths(params, targets))
    adapters: dict = {}
    leaves = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if leaf_path(p) in chosen]
    for i, (path, x) in enumerate(leaves):
        m, n = _matrix_shape(tuple(x.shape))
        bound = 1.0 / math.sqrt(m)
        a = jax.random.uniform(jax.random.fold_in(key, i), (m, rank), x.dtype, -bound, bound)
        _put(adapters, _keys(path), {"a": a, "b": jnp.zeros((rank, n), x.dtype)})
    return adapters


def _is_adapter(node) -> bool:
    return isinstance(node, dict) and set(node) == {"a", "b"} and not isinstance(node["a"], dict)


def _adapter_paths(adapters, prefix=()) -> list[tuple[str, ...]]:
    if _is_adapter(adapters):
        return [prefix]
    if not isinstance(adapters, dict):
        raise LoRAError(f"lora adapters at {'/'.join(prefix) or '<top>'}: expected nested dicts ending in "
                        f"{{'a': A, 'b': B}}, got {type(adapters).__name__}")
    return [p for k, v in adapters.items() for p in _adapter_paths(v, prefix + (str(k),))]


def merge(params, adapters, *, alpha: float, dtype=None):
    """``params`` with each adapter folded in: ``W + (alpha / rank) * reshape(A @ B, W.shape)``.

    A plain params tree of ``params``' structure, for the model the adapters were made for.
    ``dtype``: compute the merge in this float dtype and cast every float leaf of ``params``
    to it (None: each leaf's own dtype).  An adapter whose path is not a leaf of ``params`` or
    whose shapes do not fit it is a :class:`LoRAError`.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    known = {tuple(_keys(p)) for p, _ in leaves}
    stray = [p for p in _adapter_paths(adapters) if p not in known]
    if stray:
        raise LoRAError(f"lora adapters for {['/'.join(p) for p in stray]}, which are not parameters of the model "
                        f"(its parameters: {sorted('/'.join(k) for k in known)})")

    def one(path, w):
        if dtype is not None and jnp.issubdtype(jnp.result_type(w), jnp.floating):
            w = w.astype(dtype)
        ad = _get(adapters, _keys(path))
        if ad is None:
            return w
        a, b = ad["a"], ad["b"]
        m, n = _matrix_shape(jnp.shape(w))
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != m or b.shape[1] != n or a.shape[1] != b.shape[0]:
            raise LoRAError(f"lora adapter {leaf_path(path)}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                            f"a parameter of shape {tuple(jnp.shape(w))} (expected A ({m}, r), B (r, {n}))")
        delta = (alpha / a.shape[1]) * (a @ b)
        return (w + delta.reshape(jnp.shape(w)).astype(w.dtype)).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(one, params)


def _float_dtype(adapters):
    for x in jax.tree.leaves(adapters):
        if jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return jnp.result_type(x)
    return None


def adapt(model: Layer, *, rank: int, alpha: float, targets: str) -> Layer:
    """``model`` with rank-``rank`` adapters on the parameters ``targets`` matches, as a Layer whose
    params are the adapters (see the module docstring).

    * ``init(key, input_shape) -> (adapters, {"base": params, "model": state}, output_shape)``:
      ``model``'s own init (``fold_in(key, 0)``) gives the base params, to be replaced by trained
      ones with :func:`set_base`; the adapters come from :func:`init` (``fold_in(key, 1)``).
    * ``apply(adapters, state, x, ...)``: ``model.apply(merge(base, adapters), ...)``; the
      returned state holds the base params as they came in.
    """
    if not isinstance(model, Layer):
        raise TypeError(f"lora.adapt expects a fundl Layer, got {type(model).__name__}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise LoRAError(f"lora rank must be an int >= 1, got {rank!r}")
    _compile(targets)

    def init_fn(key, input_shape):
        params, state, out_shape = model.init(jax.random.fold_in(key, 0), input_shape)
        adapters = init(jax.random.fold_in(key, 1), params, rank=rank, targets=targets)
        return adapters, {"base": params, "model": state}, out_shape

    def apply(adapters, state, x, *, key=None, train=False):
        base = state["base"]
        params = merge(base, adapters, alpha=alpha, dtype=_float_dtype(adapters))
        y, new_state = model.apply(params, state["model"], x, key=key, train=train)
        return y, {"base": base, "model": new_state}

    return Layer(init_fn, apply, f"lora_{model.name}", model.auto_name)


def set_base(state, params):
    """The state of an :func:`adapt` ed model with ``params`` as its frozen base; each leaf must
    have the shape and dtype of the one it replaces (else a :class:`LoRAError` listing them)."""
    if not isinstance(state, dict) or set(state) != {"base", "model"}:
        raise LoRAError(f"lora.set_base expects the state of a lora.adapt model ({{'base': ..., 'model': ...}}), "
                        f"got {type(state).__name__}")
    old = {leaf_path(p): (tuple(jnp.shape(x)), jnp.result_type(x))
           for p, x in jax.tree_util.tree_flatten_with_path(state["base"])[0]}
    new = {leaf_path(p): (tuple(jnp.shape(x)), jnp.result_type(x))
           for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    if old != new:
        diff = [f"{p}: model {old.get(p)}, given {new.get(p)}" for p in sorted(set(old) | set(new))
                if old.get(p) != new.get(p)]
        raise LoRAError("lora.set_base: the params do not fit the model (shape, dtype):\n  " + "\n  ".join(diff[:5])
                        + (f"\n  ... and {len(diff) - 5} more" if len(diff) > 5 else ""))
    return {"base": params, "model": state["model"]}
