"""Generic checks every fundl layer must pass (shared by the layer tests).

``check_layer`` asserts the layer contract:
* the output shape ``init`` predicts equals the shape ``apply`` returns;
* ``abstract_init`` (no FLOPs) agrees with ``init`` in structure, shapes, dtypes;
* ``apply`` under ``jit`` equals eager ``apply``;
* ``apply`` under ``vmap`` over an extra leading axis equals a Python loop;
* ``grad`` of a scalar of the output w.r.t. params (and float inputs) is finite;
* a second jitted call with new inputs of the same shape does not recompile.

Only ``apply`` runs eagerly (for the jit-equals-eager check): ``init`` and the vmapped ``apply``
run under ``jit``, one program each, where eagerly every primitive would compile on its own
(eager ``init`` is what the layers' own tests call).
"""

import jax
import jax.numpy as jnp
import numpy as np

from fundl import nn
from fundl.train.state import init_compiler_options


def example_input(seed, shape, dtype=jnp.float32, maxval=None):
    """Inputs drawn with NumPy: jax.random would compile once per new shape."""
    rng = np.random.default_rng(seed)
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.asarray(rng.integers(0, maxval or 10, shape), dtype)
    return jnp.asarray(rng.normal(size=shape), dtype)


def _shapes(tree):
    return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)


def _out_shapes(y):
    return jax.tree.map(lambda a: tuple(a.shape), y)


def _jitted_init(layer: nn.Layer, key, input_shape):
    """``layer.init`` under ``jit``: params and state computed, the output shape (static) returned as is.
    Compiled as ``create_train_state`` compiles it (``init_compiler_options``: run once)."""
    box = {}

    def arrays(key):
        params, state, box["out"] = layer.init(key, input_shape)
        return params, state

    params, state = jax.jit(arrays, compiler_options=init_compiler_options())(key)
    return params, state, box["out"]


def check_layer(layer: nn.Layer, input_shape, *, dtype=jnp.float32, maxval=None,
                train=False, needs_key=False, rtol=1e-5, atol=1e-5, vmap_size=2):
    key = jax.random.key(0)
    k_init, k_apply = jax.random.split(key)
    params, state, out_shape = _jitted_init(layer, k_init, input_shape)
    call_key = k_apply if (train or needs_key) else None

    # abstract init agrees with concrete init
    a_params, a_state, a_out = nn.abstract_init(layer, input_shape)
    assert _shapes(a_params) == _shapes(params)
    assert _shapes(a_state) == _shapes(state)
    assert a_out == out_shape

    x = example_input(1, input_shape, dtype, maxval)
    y, new_state = layer.apply(params, state, x, key=call_key, train=train)
    assert _out_shapes(y) == jax.tree.map(tuple, out_shape, is_leaf=lambda s: isinstance(s, tuple) and all(isinstance(d, int) for d in s)), (
        f"init predicted {out_shape}, apply produced {_out_shapes(y)}")
    assert _shapes(new_state) == _shapes(state), "apply changed the state's structure"

    # jit equals eager; no recompilation on new inputs of the same shape
    f = jax.jit(lambda p, s, x: layer.apply(p, s, x, key=call_key, train=train))
    yj, _ = f(params, state, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), yj, y)
    x2 = example_input(2, input_shape, dtype, maxval)
    f(params, state, x2)
    assert f._cache_size() == 1, "a second call with the same shapes recompiled"

    # vmap over an extra leading axis equals a loop
    xs = jnp.stack([x, x2][:vmap_size])
    yv, _ = jax.jit(jax.vmap(lambda x: layer.apply(params, state, x, key=call_key, train=train)))(xs)
    for i in range(xs.shape[0]):
        yi, _ = f(params, state, xs[i])  # compiled above for this shape
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=rtol, atol=atol), yv, yi)

    # grad is finite w.r.t. params and (float) inputs
    def scalar(p, x):
        y, _ = layer.apply(p, state, x, key=call_key, train=train)
        return sum(jnp.sum(jnp.sin(l.astype(jnp.float32))) for l in jax.tree.leaves(y))

    if jnp.issubdtype(dtype, jnp.floating):
        gp, gx = jax.jit(jax.grad(scalar, argnums=(0, 1)))(params, x)
        assert np.all(np.isfinite(gx))
    else:
        gp = jax.jit(jax.grad(scalar))(params, x)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(gp))
    return params, state, y
