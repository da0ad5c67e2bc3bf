"""Gradients through training: d(validation loss)/d(learning rate) through K real
training steps (``make_train_step`` with an Optax optimiser on a ``TrainState``)
scanned with ``jax.lax.scan``, against central finite differences.

Params, data and the validation loss are float64; inside the step the loss is
float32 (as always in fundl), which bounds the agreement at about 1e-6.

The learning rate is an input, not a closure constant: ``optax.inject_hyperparams``
keeps it in the optimiser state, where the differentiated function puts it.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

from fundl import models
from fundl.train.state import create_train_state
from fundl.train.step import make_train_step

K = 5  # training steps differentiated through
LR = 0.05


def setup(name):
    """Model, the scanned-over batches (K, ...), a validation batch, and a float64 TrainState."""
    model = models.mlp([16], 3, activation="tanh", dropout=0.1)  # smooth; dropout uses the step keys
    opt = optax.inject_hyperparams(getattr(optax, name))(learning_rate=LR)
    kx, kw, kv = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(kw, (6, 3), jnp.float64)
    x = jax.random.normal(kx, (K, 32, 6), jnp.float64)
    x_val = jax.random.normal(kv, (64, 6), jnp.float64)
    batches = {"x": x, "y": jnp.argmax(x @ w, -1)}
    val = {"x": x_val, "y": jnp.argmax(x_val @ w, -1)}
    state = create_train_state(model, opt, jax.random.key(1), (1, 6))
    params = jax.tree.map(lambda p: p.astype(jnp.float64), state.params)
    return model, opt, batches, val, state.replace(params=params, opt_state=opt.init(params))


def val_loss_after_training(lr, model, step, state, batches, val):
    """Set the learning rate in the optimiser state, train K steps, return the validation loss."""
    hp = {**state.opt_state.hyperparams, "learning_rate": lr}
    state = state.replace(opt_state=state.opt_state._replace(hyperparams=hp))
    state, _ = jax.lax.scan(step, state, batches)
    out, _ = model.apply(state.params, state.model_state, val["x"])
    logp = jax.nn.log_softmax(out)  # float64 (fundl's losses compute in float32)
    return -jnp.mean(jnp.take_along_axis(logp, val["y"][:, None], axis=-1))


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_grad_of_validation_loss_wrt_learning_rate_matches_finite_differences(name):
    with jax.enable_x64(True):
        model, opt, batches, val, state = setup(name)
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


def test_meta_gradient_through_adam_needs_eps_root_when_a_gradient_is_exactly_zero():
    """Adam divides by sqrt(nu): its derivative at nu = 0 is infinite, so one exactly-zero gradient
    entry (a dead ReLU unit, an unused input) turns the meta-gradient into NaN; optax's eps_root > 0
    (inside the square root) is the documented cure.  Here input feature 0 is always 0, so the first
    layer's weights from it get exactly zero gradients."""
    from fundl.transforms.through_training import unrolled_training, with_learning_rate

    model = models.mlp([8], 3, activation="tanh")
    x = jax.random.normal(jax.random.key(0), (3, 16, 4)).at[..., 0].set(0.0)
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
