"""DP-SGD: the step against plain SGD (huge clip, no noise), against a hand computation
(clipping, masking, the documented noise keys, the expected-batch divisor), against
optax.contrib's DP aggregate where they overlap, across a named device axis, through fit
with the Poisson loader; and epsilon against published values and an independent RDP."""

import importlib.util
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fundl.run import config as cfg
from fundl import models
from fundl.data import load_dataset
from fundl.data.poisson import PoissonLoader
from fundl.losses import softmax_cross_entropy
from fundl.train.loop import Every, evaluate, fit
from fundl.train.state import create_train_state
from fundl.train.step import make_eval_step, make_train_step
from fundl.transforms import DPTraining, ExampleCouplingError, epsilon, make_dp_train_step, privatize
from fundl.transforms.per_example import model_loss, per_example_grads

needs_accounting = pytest.mark.skipif(importlib.util.find_spec("dp_accounting") is None,
                                      reason="dp-accounting is not installed (pip install fundl[privacy])")

MODEL = models.mlp([16], 4)
LR = 0.1


def state_and_batches(n_batches=3, b=8, seed=0):
    rng = np.random.default_rng(seed)
    state = create_train_state(MODEL, optax.sgd(LR), jax.random.key(3), (1, 6))
    batches = [{"x": jnp.asarray(rng.normal(size=(b, 6)) * 3, jnp.float32),
                "y": jnp.asarray(rng.integers(0, 4, b), jnp.int32)} for _ in range(n_batches)]
    return state, batches


def loop_grads(params, batch):
    def loss(p, x, y):
        return softmax_cross_entropy(MODEL.apply(p, {}, x)[0], y).mean()
    gs = [jax.grad(loss)(params, batch["x"][i:i + 1], batch["y"][i:i + 1]) for i in range(len(batch["y"]))]
    return jax.tree.map(lambda *g: np.stack([np.asarray(x, np.float64) for x in g]), *gs)


def close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


# ------------------------------------------------------------------ the step
@pytest.mark.slow
def test_huge_clip_and_no_noise_equal_plain_sgd_on_the_mean_gradient():
    state, batches = state_and_batches()
    opt = optax.sgd(LR)
    plain = jax.jit(make_train_step(MODEL, opt))
    dp = jax.jit(make_dp_train_step(MODEL, opt, clip_norm=1e9, noise_multiplier=0.0, expected_batch_size=8))
    s_plain, s_dp = state, state
    for batch in batches:
        s_plain, m_plain = plain(s_plain, batch)
        s_dp, m_dp = dp(s_dp, batch)
        close(s_dp.params, s_plain.params)
        np.testing.assert_allclose(m_dp["loss"], m_plain["loss"], rtol=1e-6)
        np.testing.assert_allclose(m_dp["accuracy"], m_plain["accuracy"])
        assert m_dp["clipped"] == 0 and m_dp["batch_size"] == 8
    assert int(s_dp.step) == 3


@pytest.mark.slow
def test_clipping_noise_and_divisor_equal_a_hand_computation():
    state, (batch, _, _) = state_and_batches()
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1], np.float32)  # two padding rows
    batch = {**batch, "mask": jnp.asarray(mask)}
    g = loop_grads(state.params, batch)
    leaves = jax.tree.leaves(g)
    norms = np.sqrt(sum((l.reshape(8, -1) ** 2).sum(1) for l in leaves))
    clip = float(np.median(norms[mask > 0]))  # some examples clipped, some not
    sigma, expected = 1.3, 10.0
    assert (norms[mask > 0] > clip).any() and (norms[mask > 0] < clip).any()
    factor = np.minimum(1.0, clip / norms) * mask
    summed = jax.tree.map(lambda l: np.tensordot(factor, l, axes=1), g)
    # the documented keys: step key = fold_in(base key, step); (model key, noise key) = split;
    # leaf j's noise from split(noise key, L)[j] in jax.tree.leaves order
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    _, noise_key = jax.random.split(step_key)
    p_leaves, treedef = jax.tree.flatten(state.params)
    keys = jax.random.split(noise_key, len(p_leaves))
    noise = jax.tree.unflatten(treedef, [np.asarray(jax.random.normal(k, p.shape)) * sigma * clip
                                         for k, p in zip(keys, p_leaves)])
    want = jax.tree.map(lambda p, s, z: np.asarray(p) - LR * (s + z) / expected, state.params, summed, noise)

    step = jax.jit(make_dp_train_step(MODEL, optax.sgd(LR), clip_norm=clip, noise_multiplier=sigma,
                                      expected_batch_size=expected))
    new, metrics = step(state, batch)
    close(new.params, want, rtol=1e-4, atol=1e-6)
    real = mask > 0
    assert metrics["batch_size"] == 6
    np.testing.assert_allclose(metrics["grad_norm"], norms[real].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["clipped"], (norms[real] > clip).mean())
    logits = MODEL.apply(state.params, {}, batch["x"])[0]
    losses = np.asarray(softmax_cross_entropy(logits, batch["y"]))
    np.testing.assert_allclose(metrics["loss"], losses[real].mean(), rtol=1e-5)


@pytest.mark.slow
def test_padding_rows_contribute_nothing():
    state, (batch, _, _) = state_and_batches()
    mask = jnp.asarray([1, 1, 1, 1, 1, 0, 0, 0], jnp.float32)
    garbage = {"x": batch["x"].at[5:].set(1e4), "y": batch["y"], "mask": mask}
    other = {"x": batch["x"].at[5:].set(-7.0), "y": batch["y"].at[5:].set(0), "mask": mask}
    step = jax.jit(make_dp_train_step(MODEL, optax.sgd(LR), clip_norm=0.5, noise_multiplier=0.7,
                                      expected_batch_size=5))
    a, ma = step(state, garbage)
    b, mb = step(state, other)
    close(a.params, b.params, rtol=0, atol=0)
    assert float(ma["loss"]) == float(mb["loss"])


@pytest.mark.slow
def test_matches_optax_contrib_dp_aggregate_where_they_overlap():
    """optax.contrib.differentially_private_aggregate (the core of optax.contrib.dpsgd): clip each
    example to the global norm, sum, add N(0, (sigma C)^2), divide by the batch's leading size.
    Without noise, with every example real and expected_batch_size = that size, ours is equal."""
    state, (batch, _, _) = state_and_batches()
    grads = per_example_grads(model_loss(MODEL), state.params, batch, model_state={})[0]
    for clip in (0.3, 1e9):
        ours, _ = privatize(grads, jax.random.key(0), clip_norm=clip, noise_multiplier=0.0, expected_batch_size=8)
        agg = optax.contrib.differentially_private_aggregate(clip, 0.0, key=jax.random.key(0))
        theirs, _ = agg.update(grads, agg.init(state.params))
        close(ours, theirs, rtol=1e-6, atol=1e-7)
    # with noise the keys differ, the distribution does not: same std on a zero gradient
    zeros = {"w": jnp.zeros((4, 20000))}
    ours, _ = privatize(zeros, jax.random.key(1), clip_norm=2.0, noise_multiplier=1.5, expected_batch_size=4)
    agg = optax.contrib.differentially_private_aggregate(2.0, 1.5, key=jax.random.key(1))
    theirs, _ = agg.update(zeros, agg.init({"w": jnp.zeros(20000)}))
    for got in (ours["w"], theirs["w"]):
        np.testing.assert_allclose(np.std(np.asarray(got)), 1.5 * 2.0 / 4, rtol=0.03)


@pytest.mark.slow
def test_named_device_axis_equals_one_device():
    """Under a named axis (pmap's contract) each shard clips its own examples, the sums are
    psum-ed and the same noise is added once: equal to one device on the global batch."""
    state, (batch, _, _) = state_and_batches()
    batch = {**batch, "mask": jnp.asarray([1, 1, 1, 0, 1, 1, 0, 1], jnp.float32)}
    kw = dict(clip_norm=0.5, noise_multiplier=0.8, expected_batch_size=6)
    one, m_one = jax.jit(make_dp_train_step(MODEL, optax.sgd(LR), **kw))(state, batch)
    step = make_dp_train_step(MODEL, optax.sgd(LR), axis_name="d", **kw)
    states = jax.tree.map(lambda a: jnp.stack([a, a]), state)
    shards = jax.tree.map(lambda a: a.reshape((2, 4) + a.shape[1:]), batch)
    two, m_two = jax.jit(jax.vmap(step, axis_name="d"))(states, shards)
    for d in range(2):
        close(jax.tree.map(lambda a: a[d], two.params), one.params, rtol=1e-5, atol=1e-6)
        for k in m_one:
            np.testing.assert_allclose(m_two[k][d], m_one[k], rtol=1e-5)


@pytest.mark.slow
def test_batch_norm_model_is_refused():
    model = models.cnn1d([4], [8], 4, batch_norm=True)
    state = create_train_state(model, optax.sgd(LR), jax.random.key(0), (1, 10, 1))
    batch = {"x": jnp.ones((4, 10, 1)), "y": jnp.zeros(4, jnp.int32)}
    step = make_dp_train_step(model, optax.sgd(LR), clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    with pytest.raises(ExampleCouplingError, match="batch_norm_0.*nn.group_norm"):
        jax.jit(step)(state, batch)


def test_argument_errors():
    with pytest.raises(ValueError, match="clip_norm"):
        make_dp_train_step(MODEL, optax.sgd(LR), clip_norm=0.0, noise_multiplier=1.0, expected_batch_size=4)
    with pytest.raises(ValueError, match="float16"):
        make_dp_train_step(MODEL, optax.sgd(LR), clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4,
                           compute_dtype="float16")


# ------------------------------------------------------------- accounting
def classical_rdp_epsilon(q, sigma, steps, delta, orders=range(2, 64)):
    """An independent reference: the RDP of the Poisson-subsampled Gaussian at integer orders,
    log(sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k)/(2 sigma^2))) / (a-1) (Mironov, Talwar, Zhang 2019),
    composed over steps and converted with eps = rdp - log(delta)/(a-1) (as TF Privacy did)."""
    best = math.inf
    for a in orders:
        terms = [math.lgamma(a + 1) - math.lgamma(k + 1) - math.lgamma(a - k + 1) + (a - k) * math.log1p(-q)
                 + k * math.log(q) + (k * k - k) / (2 * sigma ** 2) for k in range(a + 1)]
        m = max(terms)
        rdp = (m + math.log(sum(math.exp(t - m) for t in terms))) / (a - 1)
        best = min(best, steps * rdp - math.log(delta) / (a - 1))
    return best


# TF Privacy's MNIST tutorial table (tutorials/README.md): 60000 examples, batch 256, delta 1e-5
PUBLISHED = [(1.12, 60, 2.92), (0.6, 30, 9.74), (1.2, 10, 1.20)]


@pytest.mark.slow
@needs_accounting
@pytest.mark.parametrize("sigma,epochs,published", PUBLISHED)
def test_epsilon_against_published_values(sigma, epochs, published):
    q, steps = 256 / 60000, epochs * 60000 // 256
    assert classical_rdp_epsilon(q, sigma, steps, 1e-5) == pytest.approx(published, rel=0.01)
    rdp = epsilon(sigma, q, steps, 1e-5, accountant="rdp")
    pld = epsilon(sigma, q, steps, 1e-5, accountant="pld")
    # dp-accounting's RDP uses a tighter RDP -> (eps, delta) conversion; PLD is tighter still
    assert pld < rdp < published * 1.005
    assert pld > 0.75 * rdp


@needs_accounting
def test_epsilon_edge_cases_and_monotonicity():
    assert epsilon(1.0, 0.01, 0, 1e-5) == 0.0
    assert epsilon(0.0, 0.01, 10, 1e-5) == math.inf
    e = [epsilon(1.0, 0.025, t, 1e-5, accountant="rdp") for t in (100, 200, 400)]
    assert e[0] < e[1] < e[2]
    assert epsilon(2.0, 0.025, 400, 1e-5, accountant="rdp") < e[2]
    with pytest.raises(ValueError, match="delta"):
        epsilon(1.0, 0.01, 10, 1.5)
    with pytest.raises(ValueError, match="accountant"):
        epsilon(1.0, 0.01, 10, 1e-5, accountant="moments")


# ------------------------------------------------- a run: loader, fit, summary
@pytest.mark.slow
@needs_accounting
def test_fit_with_the_poisson_loader_resumes_identically_and_reports_epsilon():
    ds = load_dataset("synthetic", num_train=400, num_test=64, input_shape=(6,), num_classes=4, seed=0)
    opt = optax.adam(1e-2)
    dp = DPTraining(PoissonLoader(ds.train, 40, seed=2, prefetch=0), clip_norm=1.0, noise_multiplier=1.1,
                    delta=1e-4, accountant="rdp")
    step = dp.make_train_step(MODEL, opt)
    eval_step = jax.jit(make_eval_step(MODEL))
    eval_fn = dp.with_epsilon(lambda s: evaluate(eval_step, s.params, s.model_state, ds.test, 64))
    state = create_train_state(MODEL, opt, jax.random.key(0), (1, 6))
    full = fit(state, step, dp.loader, num_steps=20, eval_fn=eval_fn, every=Every(log=5, eval=10), progress=False)
    half = fit(state, step, dp.loader, num_steps=10, every=Every(log=5), progress=False)
    rest = fit(half.state, step, dp.loader, num_steps=20, every=Every(log=5), progress=False)
    close(rest.state.params, full.state.params, rtol=0, atol=0)
    evals = [r for r in full.history if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20]
    assert evals[1]["epsilon"] == pytest.approx(epsilon(1.1, 0.1, 20, 1e-4, accountant="rdp"))
    assert evals[0]["epsilon"] < evals[1]["epsilon"] and evals[1]["delta"] == 1e-4
    train = [r for r in full.history if r["split"] == "train"]
    assert all(20 <= r["batch_size"] <= 60 for r in train)  # Poisson: about 40 real examples a step
    summary = dp.summary(20)
    assert summary["epsilon"] == evals[1]["epsilon"] and summary["delta"] == 1e-4
    assert summary["privacy"]["sampling_rate"] == 0.1 and summary["privacy"]["steps"] == 20


def test_privacy_config_section_and_dp_setup_refusals():
    from fundl.run.privacy import dp_setup

    ds = load_dataset("synthetic", num_train=200, num_test=20, input_shape=(6,), num_classes=4)
    base = {"data": {"name": "synthetic"}, "training": {"batch_size": 20}}
    assert dp_setup(cfg.validate(base), ds) is None  # off by default
    on = cfg.validate({**base, "privacy": {"enabled": True, "noise_multiplier": 0.9, "delta": 1e-6}})
    dp = dp_setup(on, ds)
    assert isinstance(dp.loader, PoissonLoader) and dp.sampling_rate == 0.1 and dp.delta == 1e-6
    assert dp.noise_multiplier == 0.9 and dp.accountant == "pld"
    for bad, match in [({"privacy": {"delta": 1.0}}, "delta"), ({"privacy": {"clip_norm": 0.0}}, "clip_norm"),
                       ({"privacy": {"noise_multiplier": -1.0}}, "noise_multiplier"),
                       ({"privacy": {"sampling": "shuffle"}}, "poisson"), ({"privacy": {"accountant": "x"}}, "pld")]:
        with pytest.raises(cfg.ConfigError, match=match):
            cfg.validate({**base, **bad})
    for extra, match in [({"model": {"batch_norm": True}}, "batch_norm"), ({"training": {"ensemble": 2}}, "ensemble"),
                         ({"training": {"compute_dtype": "float16"}}, "float16"),
                         ({"training": {"batch_size": 500}}, "<= the 200")]:
        with pytest.raises(cfg.ConfigError, match=match):  # the rules between keys fail on validation
            dp_setup(cfg.validate({**base, "privacy": {"enabled": True}, **extra,
                                   "training": {**base["training"], **extra.get("training", {})}}), ds)
    four = types.SimpleNamespace(num_devices=4)  # a placement's size is all dp_setup reads
    assert dp_setup(cfg.validate({**base, "privacy": {"enabled": True}, "parallel": {"mode": "pmap"}}),
                    ds, four).loader.max_batch_size % 4 == 0
    with pytest.raises(cfg.ConfigError, match="parallel.mode = 'pmap'"):
        dp_setup(cfg.validate({**base, "privacy": {"enabled": True}, "parallel": {"mode": "sharding"}}), ds, four)


@pytest.mark.slow
@needs_accounting
def test_a_dp_run_writes_epsilon_and_delta_to_its_summary(tmp_path):
    """Through fundl.run.experiment.run (what scripts/train.py runs): [privacy] enabled trains with the
    Poisson loader and the DP step; summary.json and the eval records hold epsilon and delta."""
    from fundl.run.experiment import run
    from fundl.run.rundir import read_metrics, read_summary

    config = cfg.validate({"data": {"name": "synthetic", "num_train": 256, "num_test": 64},
                           "model": {"hidden": [8]},
                           "training": {"batch_size": 32, "steps": 12, "eval_every": 6, "log_every": 6,
                                        "progress": False},
                           "logging": {"plots": False},
                           "privacy": {"enabled": True, "noise_multiplier": 1.2, "delta": 1e-4}})
    summary = run(config, tmp_path / "run", verbose=False)
    want = epsilon(1.2, 32 / 256, 12, 1e-4)  # the PLD accountant, the default
    assert summary["epsilon"] == pytest.approx(want) and summary["delta"] == 1e-4
    assert read_summary(tmp_path / "run")["epsilon"] == pytest.approx(want)
    assert summary["privacy"]["sampling"] == "poisson" and summary["privacy"]["steps"] == 12
    evals = [r for r in read_metrics(tmp_path / "run") if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12] and evals[-1]["epsilon"] == pytest.approx(want)
    train = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert all("clipped" in r and "batch_size" in r for r in train)
