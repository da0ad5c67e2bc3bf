"""Gradients through training (fundl.transforms.through_training): meta-gradients through K real steps.

The validation loss after K steps of the real ``make_train_step`` (inside
``unrolled_training``, or a bare ``jax.lax.scan`` over it) is differentiated
with respect to the learning rate or its log, an initialisation scale and
per-example data weights, and each derivative is checked against a central
finite difference.  Params, data and the validation loss are float64; inside
the step the loss is float32 (as always in fundl), which bounds the agreement
at about 1e-6 relative.

The learning rate is an input, not a closure constant: ``optax.inject_hyperparams``
keeps it in the optimiser state, where the differentiated function puts it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fundl import models
from fundl.nn import flat_random
from fundl.nn.remat import compiled_memory
from fundl.train.state import create_train_state
from fundl.train.step import make_train_step
from fundl.transforms.through_training import (
    make_weighted_train_step, scale_params, unrolled_training, with_learning_rate,
)

K, B = 5, 32  # training steps differentiated through, batch size
LR = 0.05


def problem(opt_name="adam", lr=0.05, k=K, hidden=(16,), dropout=0.1):
    """A train state (optimiser built with inject_hyperparams), K batches and a validation batch;
    float64 under ``jax.enable_x64``, float32 otherwise."""
    f64 = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    model = models.mlp(list(hidden), 3, activation="tanh", dropout=dropout)  # smooth; dropout uses step keys
    opt = optax.inject_hyperparams(getattr(optax, opt_name))(learning_rate=lr)
    kx, kw, kv = jax.random.split(jax.random.key(0), 3)
    w = flat_random.normal(kw, (6, 3), f64)
    x = flat_random.normal(kx, (k, B, 6), f64)
    x_val = flat_random.normal(kv, (64, 6), f64)
    batches = {"x": x, "y": jnp.argmax(x @ w, -1)}
    val = {"x": x_val, "y": jnp.argmax(x_val @ w, -1)}
    state = create_train_state(model, opt, jax.random.key(1), (1, 6))
    params = jax.tree.map(lambda p: p.astype(f64), state.params)
    return model, opt, batches, val, state.replace(params=params, opt_state=opt.init(params))


def val_loss(model, state, val):
    out, _ = model.apply(state.params, state.model_state, val["x"])
    logp = jax.nn.log_softmax(out)  # float64 (fundl's losses compute in float32)
    return -jnp.mean(jnp.take_along_axis(logp, val["y"][:, None], axis=-1))


def central_difference(f, x, eps):
    return (f(x + eps) - f(x - eps)) / (2 * eps)


@pytest.mark.slow
def test_meta_gradient_wrt_log_learning_rate_matches_finite_difference():
    with jax.enable_x64(True):
        model, opt, batches, val, state = problem("adam")
        step = make_train_step(model, opt)

        @jax.jit
        def f(log_lr):
            trained, _ = unrolled_training(step, with_learning_rate(state, jnp.exp(log_lr)), batches)
            return val_loss(model, trained, val)

        log_lr = jnp.log(jnp.float64(0.05))
        # eps: the float32 loss inside the step adds ~1e-9 noise to f, so a smaller eps
        # measures noise (rel. error 2e-5 at 1e-4, 2e-6 at 1e-3, 1.5e-5 at 1e-2: truncation)
        g, fd = float(jax.grad(f)(log_lr)), float(central_difference(f, log_lr, 1e-3))
        assert abs(g) > 0.1, g  # not vacuous
        assert g == pytest.approx(fd, rel=1e-5), (g, fd)  # measured: 1.6e-6


@pytest.mark.slow
def test_meta_gradient_wrt_init_scale_matches_finite_difference():
    with jax.enable_x64(True):
        model, opt, batches, val, state = problem("sgd", lr=0.3)
        step = make_train_step(model, opt)
        weights = lambda path, _: path.endswith("/w")

        @jax.jit
        def f(scale):
            trained, _ = unrolled_training(step, scale_params(state, scale, where=weights), batches)
            return val_loss(model, trained, val)

        s = jnp.float64(1.0)
        g, fd = float(jax.grad(f)(s)), float(central_difference(f, s, 2e-3))  # eps: see the lr test
        assert abs(g) > 0.01, g
        assert g == pytest.approx(fd, rel=2e-5), (g, fd)  # measured: 4e-6 (eps 1e-3 to 3e-3)
        # scale_params scales only what `where` picks
        scaled = scale_params(state, 2.0, where=weights).params
        np.testing.assert_array_equal(scaled["dense_0"]["w"], 2 * state.params["dense_0"]["w"])
        np.testing.assert_array_equal(scaled["dense_0"]["b"], state.params["dense_0"]["b"])


@pytest.mark.slow
def test_meta_gradient_wrt_per_example_weights_matches_finite_differences():
    """SGD: through Adam the validation loss is smooth but sharply curved in the weights
    (its first update is ~sign(gradient)): a central difference with eps 1e-2 along a random
    direction was off by 2x there, while SGD's agreed to 1e-6 for eps from 1e-3 to 3e-2."""
    with jax.enable_x64(True):
        model, opt, batches, val, state = problem("sgd", lr=0.3)
        step = make_weighted_train_step(model, opt)

        @jax.jit
        def f(w):
            trained, _ = unrolled_training(step, state, {**batches, "weight": w})
            return val_loss(model, trained, val)

        w = jnp.ones((K, B), jnp.float64)
        g = jax.grad(f)(w)
        assert g.shape == (K, B) and float(jnp.max(jnp.abs(g))) > 1e-3
        eps = 1e-2
        d = flat_random.normal(jax.random.key(5), (K, B), jnp.float64)  # a random direction
        fd_dir = float((f(w + eps * d) - f(w - eps * d)) / (2 * eps))
        assert float(jnp.vdot(g, d)) == pytest.approx(fd_dir, rel=1e-5)  # measured: 1e-6
        for i, j in [(0, 0), (K - 1, 7)]:  # single examples, first and last step
            e = jnp.zeros((K, B), jnp.float64).at[i, j].set(1.0)
            fd = float((f(w + eps * e) - f(w - eps * e)) / (2 * eps))
            assert float(g[i, j]) == pytest.approx(fd, rel=1e-4), (i, j, float(g[i, j]), fd)  # measured: 2e-5


@pytest.mark.slow
def test_weighted_step_with_unit_weights_equals_the_plain_step():
    model, opt, batches, _, state = problem("adam")
    batch = jax.tree.map(lambda a: a[0], batches)
    plain, m_plain = jax.jit(make_train_step(model, opt))(state, batch)
    weighted, m_w = jax.jit(make_weighted_train_step(model, opt))(state, {**batch, "weight": jnp.ones(B)})
    jax.tree.map(np.testing.assert_array_equal, plain.params, weighted.params)
    assert float(m_plain["loss"]) == float(m_w["loss"]) and float(m_plain["accuracy"]) == float(m_w["accuracy"])
    with pytest.raises(ValueError, match=r"batch\['weight'\]"):
        make_weighted_train_step(model, opt)(state, batch)


@pytest.mark.slow
def test_remat_changes_nothing_and_equals_separate_steps():
    model, opt, batches, val, state = problem("adam")  # float32
    step = make_train_step(model, opt)

    def f(log_lr, remat):
        trained, metrics = unrolled_training(step, with_learning_rate(state, jnp.exp(log_lr)), batches, remat=remat)
        return val_loss(model, trained, val), (trained, metrics)

    results = {r: jax.jit(jax.value_and_grad(f, has_aux=True), static_argnums=1)(jnp.log(0.05), r)
               for r in (False, True)}
    (v0, (s0, m0)), g0 = results[False]
    (v1, (s1, m1)), g1 = results[True]
    assert float(v0) == float(v1) and float(g0) == float(g1)  # to the bit: the same operations, recomputed
    jax.tree.map(np.testing.assert_array_equal, (s0, m0), (s1, m1))
    # ... and the scan is K ordinary steps
    one = jax.jit(step)
    s = with_learning_rate(state, jnp.exp(jnp.log(0.05)))
    for k in range(K):
        s, m = one(s, jax.tree.map(lambda a: a[k], batches))
    jax.tree.map(np.testing.assert_array_equal, s.params, s0.params)


@pytest.mark.slow
def test_learning_rate_needs_an_injected_optimizer():
    model = models.mlp([4], 3)
    state = create_train_state(model, optax.adam(1e-3), jax.random.key(0), (1, 6))
    with pytest.raises(ValueError, match="inject_hyperparams") as e:
        with_learning_rate(state, 0.1)
    assert "optimizer_from_config" in str(e.value)
    with pytest.raises(ValueError, match="leading axis K"):
        unrolled_training(make_train_step(model, optax.adam(1e-3)), state,
                          {"x": jnp.ones((3, 2, 6)), "y": jnp.zeros((4, 2), jnp.int32)})


@pytest.mark.slow
def test_remat_memory_grows_by_one_train_state_per_step():
    """XLA's memory analysis of grad(validation loss) through K steps: with remat the scratch
    memory grows linearly in K by about one TrainState per step (measured: exactly one);
    without it each step also keeps its activations."""
    model = models.mlp([128, 128], 3)
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    state = create_train_state(model, opt, jax.random.key(0), (1, 6))
    step = make_train_step(model, opt)
    val = {"x": jnp.zeros((64, 6)), "y": jnp.zeros((64,), jnp.int32)}

    def temp(k, remat):
        batches = {"x": jax.ShapeDtypeStruct((k, 256, 6), jnp.float32),
                   "y": jax.ShapeDtypeStruct((k, 256), jnp.int32)}

        def f(log_lr, batches):
            trained, _ = unrolled_training(step, with_learning_rate(state, jnp.exp(log_lr)), batches, remat=remat)
            return val_loss(model, trained, val)

        return compiled_memory(jax.grad(f), jax.ShapeDtypeStruct((), jnp.float32), batches)["temp"]

    t = {(10, True): temp(10, True), (40, True): temp(40, True), (40, False): temp(40, False)}
    state_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
    per_step = (t[40, True] - t[10, True]) / 30
    assert t[40, True] <= 5 * t[10, True], t   # linear (or better) in K
    assert per_step <= 1.25 * state_bytes, (per_step, state_bytes)
    assert t[40, True] < t[40, False], t       # and less than keeping every step's activations


# --------------------------------------------------------------------------
# Through a bare lax.scan of the real step; Adam's eps_root; the meta_lr script


def val_loss_after_training(lr, model, step, state, batches, val):
    """Set the learning rate in the optimiser state, train K steps, return the validation loss."""
    hp = {**state.opt_state.hyperparams, "learning_rate": lr}
    state = state.replace(opt_state=state.opt_state._replace(hyperparams=hp))
    state, _ = jax.lax.scan(step, state, batches)
    out, _ = model.apply(state.params, state.model_state, val["x"])
    logp = jax.nn.log_softmax(out)  # float64 (fundl's losses compute in float32)
    return -jnp.mean(jnp.take_along_axis(logp, val["y"][:, None], axis=-1))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_grad_of_validation_loss_wrt_learning_rate_matches_finite_differences(name):
    with jax.enable_x64(True):
        model, opt, batches, val, state = problem(name, lr=LR)
        step = make_train_step(model, opt)
        f = jax.jit(lambda lr: val_loss_after_training(lr, model, step, state, batches, val))
        lr = jnp.float64(LR)
        g = float(jax.grad(f)(lr))
        eps = 1e-4
        fd = float((f(lr + eps) - f(lr - eps)) / (2 * eps))
        assert abs(g) > 1.0, g  # not vacuous: K steps move the validation loss a lot
        assert g == pytest.approx(fd, rel=1e-5), (g, fd)  # measured: 6e-7 (sgd), 5e-8 (adam)

        # jax.checkpoint on the step (memory linear in K) recomputes in the backward pass
        # and changes nothing, to the bit.
        f_remat = jax.jit(lambda lr: val_loss_after_training(lr, model, jax.checkpoint(step), state, batches, val))
        assert float(jax.grad(f_remat)(lr)) == g


@pytest.mark.slow
def test_meta_gradient_through_adam_needs_eps_root_when_a_gradient_is_exactly_zero():
    """Adam divides by sqrt(nu): its derivative at nu = 0 is infinite, so one exactly-zero gradient
    entry (a dead ReLU unit, an unused input) turns the meta-gradient into NaN; optax's eps_root > 0
    (inside the square root) is the documented cure.  Here input feature 0 is always 0, so the first
    layer's weights from it get exactly zero gradients."""
    model = models.mlp([8], 3, activation="tanh")
    x = flat_random.normal(jax.random.key(0), (3, 16, 4)).at[..., 0].set(0.0)
    batches = {"x": x, "y": jnp.zeros((3, 16), jnp.int32)}

    def meta_grad(**adam_kw):
        opt = optax.inject_hyperparams(optax.adam)(learning_rate=0.01, **adam_kw)
        state = create_train_state(model, opt, jax.random.key(1), (1, 4))
        step = make_train_step(model, opt)

        def f(log_lr):
            trained, _ = unrolled_training(step, with_learning_rate(state, jnp.exp(log_lr)), batches)
            out, _ = model.apply(trained.params, trained.model_state, x[0])
            return jnp.mean(out ** 2)

        return float(jax.jit(jax.grad(f))(jnp.log(0.01)))

    assert jnp.isnan(meta_grad())
    assert jnp.isfinite(meta_grad(eps_root=1e-8))


@pytest.mark.slow
def test_meta_lr_script_runs_with_tiny_settings(tmp_path):
    """examples/meta_lr.py end to end on MNIST-1D (generated offline) with tiny settings, run as its
    users run it: the plot, the JSON (history, sweep, comparison) and the table are written, and the
    learned rate stays inside the swept range."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "examples/meta_lr.py", "--out", str(tmp_path), "--inner-steps", "4", "--outer-steps", "3",
         "--sweep-points", "3", "--val", "200", "--hidden", "16", "--batch", "32", "--init-lr", "1e-3",
         "--lr-range", "1e-4,1e-1"], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "meta_lr.json").read_text())
    assert len(result["history"]) == 3 and len(result["sweep"]) == 3
    assert all(jnp.isfinite(h["d_val_loss_d_log_lr"]) for h in result["history"])
    assert 1e-4 <= result["learned"]["lr"] <= 1e-1
    assert result["sweep_best"] in result["sweep"]
    assert (tmp_path / "meta_lr.png").stat().st_size > 10_000
    assert "best of a 3-point sweep" in (tmp_path / "meta_lr.md").read_text()
