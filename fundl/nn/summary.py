"""A table of a model's layers: path, output shape, parameter count."""

from __future__ import annotations

import math

import jax

from fundl.nn.children import record_shapes
from fundl.nn.core import Layer, abstract_init


def _subtree(tree, path: str):
    for part in path.split("/"):
        if not isinstance(tree, dict) or part not in tree:
            return {}
        tree = tree[part]
    return tree


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def summary(model: Layer, input_shape, *, print_fn=print) -> int:
    """Print every layer's path, output shape and parameter count (composite
    layers count their children); return the model's total parameter count.

    Runs ``init`` abstractly (``jax.eval_shape``): no FLOPs, any model size.
    ``input_shape`` includes the batch axis.

    Examples:
        >>> total = nn.summary(nn.serial(nn.dense(8), nn.relu, nn.dense(2)), (1, 4))
        layer    output shape        params
        -----------------------------------
        dense_0  (1, 8)                  40
        relu_0   (1, 8)                   0
        dense_1  (1, 2)                  18
        -----------------------------------
        input (1, 4) -> output (1, 2)
        total params: 58
        >>> total
        58
    """
    with record_shapes() as rows:
        params, state, out_shape = abstract_init(model, tuple(input_shape))
    total = _count(params)
    table = [(path, str(shape), _count(_subtree(params, path))) for path, shape in rows]
    w_path = max([len(r[0]) for r in table] + [5])
    w_shape = max([len(r[1]) for r in table] + [12])
    line = "-" * (w_path + w_shape + 16)
    out = [f"{'layer':<{w_path}}  {'output shape':<{w_shape}}  {'params':>12}", line]
    out += [f"{path:<{w_path}}  {shape:<{w_shape}}  {n:>12,}" for path, shape, n in table]
    n_state = _count(state)
    out += [line, f"input {tuple(input_shape)} -> output {out_shape}",
            f"total params: {total:,}" + (f"   state (non-trainable): {n_state:,}" if n_state else "")]
    print_fn("\n".join(out))
    return total
