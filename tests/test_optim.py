"""Config -> optimiser: every [optimizer] setting reaches optax exactly or is an error naming it.

Each catalogue optimiser built by ``fundl.run.optimizer.optimizer_from_config`` is run on the same
random gradients as a hand-written reference (a direct ``optax.<name>`` call,
with clipping, accumulation and decoupled weight decay done by hand).
"""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fundl.nn import flat_random
from fundl.run.config import OPTIMIZERS, ConfigError, validate
from fundl.run.optimizer import optimizer_from_config
from fundl.train.optim import OptimizerError, make_optimizer, make_schedule

LR = 0.1


def takes(name, key):
    return key in inspect.signature(getattr(optax, name)).parameters


def config(name, **optimizer):
    training = {"nan_policy": optimizer.pop("nan_policy", "stop")}
    schedule = {"name": optimizer.pop("schedule", "constant")}
    return validate({"optimizer": {"name": name, "learning_rate": LR, **optimizer},
                     "schedule": schedule, "training": training})


def params0():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w": flat_random.normal(k1, (3, 4)), "b": flat_random.normal(k2, (4,))}


def grads(n, seed=1):
    keys = jax.random.split(jax.random.key(seed), n)
    return [jax.tree.map(lambda p, k=k: flat_random.normal(jax.random.fold_in(k, p.size), p.shape), params0())
            for k in keys]


def run(opt, gs, params=None):
    params = params0() if params is None else params
    state, update = opt.init(params), jax.jit(opt.update)
    for g in gs:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


def reference(name, gs, *, weight_decay=0.0, clip_norm=0.0, accumulate=1, schedule=None, **kw):
    """optax.<name> by hand: average ``accumulate`` grads, clip, update, then decoupled decay."""
    lr = schedule or (lambda t: LR)
    inside = takes(name, "weight_decay")
    opt = getattr(optax, name)(learning_rate=schedule or LR, **kw, **({"weight_decay": weight_decay} if inside else {}))
    params = params0()
    state, update = opt.init(params), jax.jit(opt.update)
    for t, i in enumerate(range(0, len(gs), accumulate)):
        g = jax.tree.map(lambda *x: sum(x) / len(x), *gs[i:i + accumulate])
        norm = optax.tree.norm(g)
        if clip_norm and norm > clip_norm:
            g = jax.tree.map(lambda x: x * clip_norm / norm, g)
        u, state = update(g, state, params)
        if not inside:
            u = jax.tree.map(lambda u, p: u - lr(t) * weight_decay * p, u, params)
        params = jax.tree.map(jnp.add, params, u)
    return params


VARIANTS = {
    "defaults": {},
    "decay": {"weight_decay": 0.1},
    "everything": {"weight_decay": 0.1, "clip_norm": 0.5, "accumulate_steps": 2, "schedule": "cosine",
                   "nan_policy": "skip"},
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_catalogue_optimizer_matches_direct_optax(name, variant):
    settings = dict(VARIANTS[variant])
    momentum = {}
    if variant == "everything" and takes(name, "momentum"):
        momentum = {"momentum": 0.9, "nesterov": True}
    gs = grads(8)
    steps = 8 // settings.get("accumulate_steps", 1)
    got = run(optimizer_from_config(config(name, **settings, **momentum), total_steps=steps), gs)
    want = reference(name, gs, weight_decay=settings.get("weight_decay", 0.0), clip_norm=settings.get("clip_norm", 0.0),
                     accumulate=settings.get("accumulate_steps", 1),
                     schedule=optax.cosine_decay_schedule(LR, steps) if "schedule" in settings else None, **momentum)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    assert not jax.tree.all(jax.tree.map(lambda a, b: np.allclose(a, b), got, params0()))


# ------------------------------------------------------------- weight decay
def test_adamw_with_zero_weight_decay_is_adam_exactly():
    gs = grads(4)
    want = run(optax.adam(LR), gs)
    chex.assert_trees_all_equal(run(optimizer_from_config(config("adamw", weight_decay=0.0), 4), gs), want)
    chex.assert_trees_all_equal(run(make_optimizer("adamw", LR), gs), want)


def test_lion_with_zero_weight_decay_has_no_decay():
    gs = grads(4)
    got = run(optimizer_from_config(config("lion", weight_decay=0.0), 4), gs)
    chex.assert_trees_all_equal(got, run(optax.lion(LR, weight_decay=0.0), gs))


def test_adam_weight_decay_is_decoupled_like_adamw():
    """adam + weight_decay is AdamW (decay outside the preconditioner), not L2 through Adam."""
    gs = grads(4)
    sched = optax.cosine_decay_schedule(LR, 4)
    got = run(optimizer_from_config(config("adam", weight_decay=0.5, schedule="cosine"), 4), gs)
    chex.assert_trees_all_close(got, run(optax.adamw(sched, weight_decay=0.5), gs), rtol=1e-6, atol=1e-6)


def test_sgd_decoupled_weight_decay_by_hand():
    """p <- p - lr(t) * m_t - lr(t) * wd * p, with m_t = g_t + 0.9 m_{t-1} (SGDW); the decay skips momentum."""
    gs, wd = grads(3), 0.2
    lr = lambda t: LR * 0.5 * (1 + np.cos(np.pi * t / 3))  # cosine decay to 0 over 3 steps
    got = run(optimizer_from_config(config("sgd", momentum=0.9, weight_decay=wd, schedule="cosine"), 3), gs)
    p = jax.tree.map(np.asarray, params0())
    m = jax.tree.map(np.zeros_like, p)
    for t, g in enumerate(gs):
        m = {k: np.asarray(g[k]) + 0.9 * m[k] for k in p}
        p = {k: p[k] - lr(t) * m[k] - lr(t) * wd * p[k] for k in p}
    chex.assert_trees_all_close(got, p, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------- momentum, nesterov
@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if not takes(n, "momentum")])
def test_momentum_on_optimizer_without_it_is_config_error(name):
    with pytest.raises(ConfigError, match=rf"optimizer\.momentum=0\.9 is not used by optax\.{name}\b.*: sgd, rmsprop$"):
        optimizer_from_config(config(name, momentum=0.9), 10)


def test_momentum_error_points_adam_users_to_b1():
    with pytest.raises(ConfigError, match=r"optax\.adam \(it takes b1 for its first moment\)"):
        optimizer_from_config(config("adam", momentum=0.9), 10)


def test_nesterov_on_optimizer_without_it_is_config_error():
    with pytest.raises(ConfigError, match=r"optimizer\.nesterov=true is not used by optax\.lion;"):
        optimizer_from_config(config("lion", nesterov=True), 10)


@pytest.mark.parametrize("name", ["sgd", "rmsprop"])
def test_nesterov_without_momentum_is_an_error(name):
    with pytest.raises(ConfigError, match=r"optimizer\.nesterov=true needs optimizer\.momentum > 0"):
        optimizer_from_config(config(name, nesterov=True), 10)
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        make_optimizer(name, LR, nesterov=True)


@pytest.mark.parametrize("name,kw", [("sgd", {"momentum": 0.9, "nesterov": True}),
                                     ("rmsprop", {"momentum": 0.9, "nesterov": True}),
                                     ("rmsprop", {"momentum": 0.5}),
                                     ("adam", {"nesterov": True})])
def test_momentum_and_nesterov_reach_optax(name, kw):
    gs = grads(4)
    got = run(optimizer_from_config(config(name, **kw), 4), gs)
    chex.assert_trees_all_equal(got, run(getattr(optax, name)(LR, **kw), gs))


# ------------------------------------------------------------------ others
@pytest.mark.parametrize("name", ["adamm", "lamb"])
def test_optimizer_outside_the_catalogue_is_config_error(name):
    with pytest.raises(ConfigError, match=rf"optimizer\.name must be one of \[.*'lion'\], got '{name}'"):
        optimizer_from_config(config(name), 10)


def test_nan_policy_skip_leaves_params_untouched_on_a_nan_gradient():
    opt = optimizer_from_config(config("adamw", weight_decay=0.1, nan_policy="skip"), 10)
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads(1)[0])
    chex.assert_trees_all_equal(run(opt, [bad]), params0())


def test_a_warmup_longer_than_the_run_is_a_config_error_naming_the_key():
    from fundl.run import config as cfg

    config = cfg.load_config(None, ['schedule.name="warmup_cosine"', "schedule.warmup_steps=100"])
    with pytest.raises(cfg.ConfigError, match="schedule.warmup_steps=100 must be smaller than the run's 50 steps"):
        optimizer_from_config(config, 50)
    optimizer_from_config(config, 101)  # fine


# ------------------------------------------------- the library's own errors
def test_library_errors_name_the_argument_and_are_value_errors():
    """make_optimizer / make_schedule know no config: their OptimizerError (a ValueError) names the argument."""
    with pytest.raises(OptimizerError, match=r"make_optimizer\(momentum=\.\.\.\): optax\.adam does not accept") as e:
        make_optimizer("adam", LR, momentum=0.9)
    assert e.value.argument == "momentum" and isinstance(e.value, ValueError)
    with pytest.raises(OptimizerError, match=r"make_optimizer\(nesterov=True\)") as e:
        make_optimizer("sgd", LR, nesterov=True)
    assert e.value.argument == "nesterov"
    with pytest.raises(OptimizerError, match=r"make_optimizer\(name='adamm'\): optax has no optimiser"):
        make_optimizer("adamm", LR)
    with pytest.raises(OptimizerError, match=r"make_schedule\(boundaries=\.\.\., scales=\.\.\.\)") as e:
        make_schedule(1.0, 10, name="piecewise", boundaries=[5], scales=[])
    assert e.value.argument == "boundaries"
    with pytest.raises(OptimizerError, match=r"make_schedule\(name='cosin'\)"):
        make_schedule(1.0, 10, name="cosin")


def test_a_library_error_reaching_the_run_layer_becomes_a_config_error_naming_the_key():
    """Rules between keys are checked on validation; what still reaches the library (a config edited after
    validation) comes back as a ConfigError naming the config key."""
    from fundl.run.optimizer import schedule_from_config

    config = validate({"schedule": {"name": "piecewise", "boundaries": [5], "scales": [0.1]}})
    config["schedule"]["scales"] = []
    with pytest.raises(ConfigError, match=r"^schedule\.boundaries: make_schedule\(boundaries=\.\.\., scales=\.\.\.\)"):
        schedule_from_config(config, 10)
    config = validate({"optimizer": {"name": "adam"}})
    config["optimizer"]["momentum"] = 0.9
    with pytest.raises(ConfigError, match=r"^optimizer\.momentum: make_optimizer\(momentum=\.\.\.\)"):
        optimizer_from_config(config, 10)


@pytest.mark.slow
def test_the_library_imports_no_run_layer():
    """fundl.train.optim (and the rest of the library) never imports fundl.run: arrows point one way."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    library = sorted(p for p in (root / "fundl").rglob("*.py") if "run" not in p.relative_to(root / "fundl").parts)
    offenders = [f"{p.relative_to(root)}:{i}" for p in library for i, line in enumerate(p.read_text().splitlines(), 1)
                 if line.lstrip().startswith(("import fundl.run", "from fundl.run", "from fundl import run"))]
    assert offenders == []
    code = "import sys, fundl.train.optim; print(sorted(m for m in sys.modules if m.startswith('fundl.run')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.strip() == "[]"
