"""Rematerialisation (fundl.nn.remat): values and gradients unchanged, less memory.

How exactly they agree: a remat layer runs the same operations, the backward
pass recomputing them.  Under ``jit`` (one XLA program either way) outputs
and gradients are bit-identical for every model here, in both modes and for
checkpointed cells.  Run eagerly they agree to float32 rounding only
(measured: 1.5e-7 in outputs, 1e-6 in gradients for the MLP): the plain model
runs op by op while the recomputed block is traced and compiled as one
program, which may fuse and round differently.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fundl import models, nn
from fundl.nn import flat_random
from fundl.nn.remat import compiled_memory, remat, remat_cell, remat_serial
from layer_checks import check_layer

KEY = jax.random.key(0)


def _loss_and_grad(model, params, state, x, train, jit):
    def f(p, x):
        y, new_state = model.apply(p, state, x, key=jax.random.key(3), train=train)
        return sum(jnp.sum(jnp.sin(l)) for l in jax.tree.leaves(y)), (y, new_state)

    g = jax.grad(f, has_aux=True)
    return (jax.jit(g) if jit else g)(params, x)


def assert_same_model(plain, rematted, shape, x, *, train=True, eager=False):
    """Same params tree and values at init; same outputs, state and grads under jit (bitwise)
    and, with ``eager``, run eagerly (to float32 rounding)."""
    p0, s0, o0 = plain.init(KEY, shape)
    p1, s1, o1 = rematted.init(KEY, shape)
    assert jax.tree.structure(p0) == jax.tree.structure(p1) and o0 == o1
    jax.tree.map(np.testing.assert_array_equal, (p0, s0), (p1, s1))
    for jit in (True, False) if eager else (True,):
        (g0, aux0) = _loss_and_grad(plain, p0, s0, x, train, jit)
        (g1, aux1) = _loss_and_grad(rematted, p0, s0, x, train, jit)
        if jit:
            jax.tree.map(np.testing.assert_array_equal, (g0, aux0), (g1, aux1))
        else:
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), (g0, aux0), (g1, aux1))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["checkpoint", "custom_vjp"])
def test_remat_layer_passes_the_layer_contract(mode):
    block = nn.serial(nn.dense(8), nn.gelu, nn.dropout(0.3))
    check_layer(remat(block, mode=mode), (2, 5), train=True)  # train and key at call time; jit, vmap, grad
    if mode == "custom_vjp":  # remat_serial, a recurrent layer (a scan) and a checkpointed cell
        check_layer(remat_serial(nn.flatten(), [nn.dense(8), nn.relu], [nn.dense(4), nn.tanh], nn.dense(2),
                                 mode=mode), (2, 3, 2))
        check_layer(remat(nn.lstm(4), mode=mode), (2, 3, 3))
        check_layer(nn.rnn(remat_cell(nn.lstm_cell(4))), (2, 3, 3))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["checkpoint", "custom_vjp"])
def test_remat_keeps_name_params_and_values(mode):
    block = nn.serial(nn.dense(8), nn.relu, nn.dropout(0.5), name="block")
    r = remat(block, mode=mode)
    assert (r.name, r.auto_name, r.init) == (block.name, block.auto_name, block.init)
    x = flat_random.normal(jax.random.key(1), (4, 5))
    assert_same_model(block, r, (1, 5), x, eager=True)
    # train is a static Python bool inside the checkpoint: eval mode is the identity dropout
    p, s, _ = r.init(KEY, (1, 5))
    np.testing.assert_array_equal(r.apply(p, s, x)[0], block.apply(p, s, x)[0])
    with pytest.raises(nn.KeyMissingError, match="needs a PRNG key"):
        r.apply(p, s, x, train=True)


@pytest.mark.slow
def test_remat_errors_name_the_layer_path():
    model = nn.serial(nn.dense(4), remat(nn.serial(nn.dense(3), name="inner")))
    p, s, _ = model.init(KEY, (1, 2))
    p["inner_0"]["dense_0"]["w"] = jnp.zeros((5, 3))
    with pytest.raises(nn.ShapeError, match="inner_0/dense_0"):
        model.apply(p, s, jnp.ones((1, 2)))
    with pytest.raises(TypeError, match="fundl Layer"):
        remat(lambda x: x)
    with pytest.raises(ValueError, match="mode must be one of"):
        remat(nn.relu, mode="offload")


@pytest.mark.slow
def test_custom_vjp_mode_is_reverse_mode_only_and_checkpoint_mode_composes_with_jvp():
    block = nn.serial(nn.dense(3), nn.tanh)
    p, s, _ = block.init(KEY, (1, 2))
    x, t = jnp.ones((1, 2)), jnp.ones((1, 2))
    f = lambda layer: (lambda x: layer.apply(p, s, x)[0])
    _, want = jax.jvp(f(block), (x,), (t,))
    np.testing.assert_allclose(jax.jvp(f(remat(block)), (x,), (t,))[1], want, rtol=1e-6)  # eager: rounding
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(f(remat(block, mode="custom_vjp")), (x,), (t,))


@pytest.mark.slow
def test_remat_serial_has_serials_params_names_and_keys():
    layers = lambda: [nn.flatten(), nn.dense(8), nn.relu, nn.dropout(0.5), nn.dense(8), nn.relu, nn.dense(3)]
    plain = nn.serial(*layers())
    ls = layers()
    rs = remat_serial(ls[0], ls[1:4], ls[4:6], ls[6])
    assert nn.summary(plain, (1, 2, 3)) == nn.summary(rs, (1, 2, 3))
    assert_same_model(plain, rs, (1, 2, 3), flat_random.normal(jax.random.key(1), (4, 2, 3)), eager=True)


@pytest.mark.slow
def test_remat_under_vmap_of_grad():
    model, rmodel = models.mlp([8, 8], 3), models.mlp([8, 8], 3, remat=True)
    p, s, _ = model.init(KEY, (1, 4))
    xs = flat_random.normal(jax.random.key(1), (5, 2, 4))

    def per_example_grads(m):
        def loss(p, x):
            return jnp.sum(m.apply(p, s, x)[0] ** 2)
        return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(p, xs)

    jax.tree.map(np.testing.assert_array_equal, per_example_grads(model), per_example_grads(rmodel))


@pytest.mark.slow
@pytest.mark.parametrize("kind,kw", [
    ("mlp", dict(dropout=0.3, input_dropout=0.1)),
    ("rnn", dict(num_layers=2, dropout=0.2)),
    ("rnn", dict(num_layers=1, bidirectional=True)),
    ("rnn", dict(num_layers=2, readout="mean", cell="gru")),
    ("char_lm", dict(num_layers=2, dropout=0.1, cell="gru")),
])
def test_model_remat_switch_changes_nothing(kind, kw):
    if kind == "mlp":
        make = lambda r: models.mlp([16, 16, 16], 5, remat=r, **kw)
        shape, x = (1, 12), flat_random.normal(jax.random.key(1), (8, 12))
    elif kind == "rnn":
        cell = kw.pop("cell", "lstm")
        make = lambda r: models.rnn_classifier(cell, 8, 3, remat=r, **kw)
        shape, x = (1, 6, 4), flat_random.normal(jax.random.key(1), (3, 6, 4))
    else:
        make = lambda r: models.char_lm(7, embed_dim=4, hidden=8, remat=r, **kw)
        shape, x = (1, 6), jnp.arange(18).reshape(3, 6) % 7
    assert_same_model(make(False), make(True), shape, x)


def _grad_memory(model, shape, batch):
    p, s, _ = nn.abstract_init(model, shape)

    def loss(p, x):
        return jnp.sum(model.apply(p, s, x, train=False)[0] ** 2)

    x = jax.ShapeDtypeStruct((batch,) + tuple(shape[1:]), jnp.float32)
    return compiled_memory(jax.grad(loss), p, x)


def _mlp(mode, depth=8, width=256):
    layers = [[nn.dense(width), nn.relu] for _ in range(depth)]
    if mode is None:
        return nn.serial(nn.flatten(), *[l for block in layers for l in block], nn.dense(10))
    return remat_serial(nn.flatten(), *layers, nn.dense(10), mode=mode)


@pytest.mark.slow
def test_remat_lowers_the_backward_pass_memory():
    """XLA's memory analysis (compile only; full-size numbers in docs/transforms.md): the
    recomputing MLP (custom_vjp, what models.mlp(remat=True) uses) and the LSTM with a
    checkpointed cell keep less for the backward pass."""
    plain, rem = _grad_memory(_mlp(None), (1, 64), 512), _grad_memory(_mlp("custom_vjp"), (1, 64), 512)
    assert rem["temp"] < 0.6 * plain["temp"] and rem["peak"] < plain["peak"], (plain, rem)  # measured: 0.53
    assert _grad_memory(models.mlp([256] * 8, 10, remat=True), (1, 64), 512) == rem
    lstm = lambda r: models.rnn_classifier("lstm", 32, 3, num_layers=2, remat=r)
    plain, rem = _grad_memory(lstm(False), (1, 128, 8), 16), _grad_memory(lstm(True), (1, 128, 8), 16)
    assert rem["temp"] < 0.5 * plain["temp"], (plain, rem)  # measured: 0.24


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a fact about XLA:CPU")
def test_xla_cpu_undoes_jax_checkpoint_outside_loops():
    """Recorded so that docs/transforms.md stays true: XLA:CPU removes the optimization barriers
    jax.checkpoint relies on before a CSE pass that merges the recomputation with the forward
    pass, so the compiled program, and its memory, are the plain one.  If this fails, XLA now
    keeps jax.checkpoint: re-measure (benchmarks/bench_remat.py) and update the docs."""
    assert _grad_memory(_mlp("checkpoint"), (1, 64), 512) == _grad_memory(_mlp(None), (1, 64), 512)
