"""The optimiser keys language-model recipes use: ``optimizer.b1`` / ``b2`` (Adam's betas) and
``optimizer.decay_matrices_only`` (nanoGPT's weight decay on >= 2-D parameters only).

Each config is run against a hand-written reference (a direct ``optax.<name>`` call with the decay
done by hand) and, where torch is installed, nanoGPT's optimiser: ``torch.optim.AdamW`` with one
parameter group decayed and one not.
"""

import inspect

import chex
import jax
import numpy as np
import optax
import pytest

from fundl.nn import flat_random
from fundl.run.config import OPTIMIZERS, ConfigError, validate
from fundl.run.optimizer import optimizer_from_config
from fundl.train.optim import make_optimizer, matrices_only

LR = 0.1
BETAS = {"b1": 0.8, "b2": 0.95}
TAKE_BETAS = [n for n in OPTIMIZERS if "b2" in inspect.signature(getattr(optax, n)).parameters]


def config(name, **optimizer):
    return validate({"optimizer": {"name": name, "learning_rate": LR, **optimizer}})


def params0():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {"w": flat_random.normal(k1, (3, 4)), "b": flat_random.normal(k2, (4,)), "e": flat_random.normal(k3, (2, 2, 3))}


def grads(n=4):
    keys = jax.random.split(jax.random.key(1), n)
    return [jax.tree.map(lambda p, k=k: flat_random.normal(jax.random.fold_in(k, p.size), p.shape), params0())
            for k in keys]


def run(opt, gs):
    params, state = params0(), opt.init(params0())
    for g in gs:  # eagerly: a compile per optimiser would cost more than these few tiny updates
        updates, state = opt.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


def by_hand(name, gs, *, weight_decay=0.0, matrices=False, **kw):
    """``optax.<name>`` with no decay of its own, then ``-lr * wd * p`` on the decayed leaves."""
    takes_decay = "weight_decay" in inspect.signature(getattr(optax, name)).parameters
    opt = getattr(optax, name)(learning_rate=LR, **kw, **({"weight_decay": 0.0} if takes_decay else {}))
    params, state = params0(), opt.init(params0())
    for g in gs:
        u, state = opt.update(g, state, params)
        decayed = lambda p: weight_decay * p if (not matrices or p.ndim >= 2) else 0.0 * p
        params = jax.tree.map(lambda p, u: p + u - LR * decayed(p), params, u)
    return params


def test_betas_reach_adamw():
    gs = grads(3)
    got = run(optimizer_from_config(config("adamw", **BETAS), total_steps=3), gs)
    chex.assert_trees_all_close(got, by_hand("adamw", gs, **BETAS), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # every optimiser's ops dispatched eagerly: seconds
def test_betas_reach_every_adam_family_optimiser():
    gs = grads(3)
    assert len(TAKE_BETAS) >= 10
    for name in TAKE_BETAS:
        got = run(optimizer_from_config(config(name, **BETAS), total_steps=3), gs)
        chex.assert_trees_all_close(got, by_hand(name, gs, **BETAS), rtol=1e-5, atol=1e-6, custom_message=name)
        assert not np.allclose(got["w"], by_hand(name, gs)["w"]), name  # the betas made a difference


def test_auto_betas_are_optax_defaults():
    """``"auto"`` (the default) passes nothing: lion keeps its b2 = 0.99 and adam its 0.999."""
    gs = grads()
    for name in ("lion", "adam"):
        chex.assert_trees_all_close(run(optimizer_from_config(config(name), total_steps=4), gs), by_hand(name, gs),
                                    rtol=1e-6, atol=1e-7)
    assert validate({})["optimizer"]["b1"] == "auto"


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adagrad"])
def test_betas_on_an_optimiser_without_them_is_a_config_error(name):
    with pytest.raises(ConfigError, match=rf"optimizer.b2=0.95 is not used by optax.{name}.*adam"):
        config(name, b2=0.95)


@pytest.mark.parametrize("value", [1.0, -0.1, "high", True])
def test_betas_out_of_range_are_config_errors(value):
    with pytest.raises(ConfigError, match=r"optimizer.b1 .*\"auto\" or a number in \[0, 1\)"):
        config("adam", b1=value)


@pytest.mark.parametrize("name", ["adamw", "sgd"])  # a mask inside optax.<name>, or chained after it
def test_decay_matrices_only_decays_the_matrices_alone(name):
    gs = grads(3)
    got = run(optimizer_from_config(config(name, weight_decay=0.1, decay_matrices_only=True), total_steps=3), gs)
    chex.assert_trees_all_close(got, by_hand(name, gs, weight_decay=0.1, matrices=True), rtol=1e-5, atol=1e-6)
    everything = run(optimizer_from_config(config(name, weight_decay=0.1), total_steps=3), gs)
    chex.assert_trees_all_close(everything, by_hand(name, gs, weight_decay=0.1), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got["b"], everything["b"])  # the vector was spared


def test_matrices_only_mask():
    assert matrices_only(params0()) == {"w": True, "b": False, "e": True}
    explicit = make_optimizer("sgd", LR, weight_decay=0.1, decay_mask={"w": True, "b": False, "e": True})
    chex.assert_trees_all_close(run(explicit, grads(2)), by_hand("sgd", grads(2), weight_decay=0.1, matrices=True),
                                rtol=1e-6)


def test_decay_matrices_only_change_is_refused_on_resume():
    from fundl.run.resume import check_changes, config_changes

    old, new = config("adamw", weight_decay=0.1), config("adamw", weight_decay=0.1, decay_matrices_only=True)
    with pytest.raises(ConfigError, match="optimizer.decay_matrices_only"):
        check_changes(config_changes(old, new), [], "run")


@pytest.mark.slow  # importing torch takes seconds
def test_nanogpt_adamw_groups_match_torch():
    """nanoGPT's ``configure_optimizers``: AdamW, betas (0.9, 0.99), decay 0.1 on >= 2-D params only."""
    torch = pytest.importorskip("torch")
    gs = grads(5)
    got = run(optimizer_from_config(config("adamw", b1=0.9, b2=0.99, weight_decay=0.1, decay_matrices_only=True),
                                    total_steps=5), gs)
    tp = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in params0().items()}
    groups = [{"params": [p for p in tp.values() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in tp.values() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.99))
    for g in gs:
        for k, p in tp.items():
            p.grad = torch.tensor(np.asarray(g[k]))
        opt.step()
    chex.assert_trees_all_close(got, {k: p.detach().numpy() for k, p in tp.items()}, rtol=1e-5, atol=1e-6)
