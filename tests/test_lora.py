"""LoRA (fundl.transforms.lora): the adapted model against LoRA's formula by hand, training that moves
the adapters alone (base params bit-identical, optimiser state of the adapters only), merging, errors,
and a fine-tune of a trained run through the command line's ``[lora]`` section."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

from fundl import models
from fundl.nn import flat_random
from fundl.train.optim import make_optimizer
from fundl.train.state import create_train_state
from fundl.train.step import make_train_step
from fundl.transforms import lora

ALPHA, RANK = 4.0, 2


def bits(tree):
    """Every leaf's raw bytes: equal bits, not merely equal values."""
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def init(model, shape, seed=0):
    """``model.init``'s params and state, compiled (eager init dispatches every op on its own)."""
    return jax.jit(lambda k: model.init(k, shape)[:2])(jax.random.key(seed))


def random_adapters(adapters, seed=3):
    """Adapters with B non-zero too (init's B is zero: the adapted model would equal the base)."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [flat_random.normal(k, x.shape, x.dtype) * 0.3 for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def mlp():
    model = models.mlp([16], 3)
    params, state = init(model, (1, 8))
    adapted = lora.adapt(model, rank=RANK, alpha=ALPHA, targets="dense_0/w$")
    return model, params, state, adapted, jax.jit(adapted.apply)


def test_adapted_model_is_lora_by_hand(mlp):
    """``x @ W + b + (alpha / r) * (x @ A) @ B`` (LoRA's forward, PEFT's scaling) on the adapted layer."""
    model, params, state, adapted, apply = mlp
    adapters, lstate = init(adapted, (1, 8), seed=1)
    assert jax.tree.map(jnp.shape, adapters) == {"dense_0": {"w": {"a": (8, RANK), "b": (RANK, 16)}}}
    assert not np.any(adapters["dense_0"]["w"]["b"])  # B = 0: training starts from the base function
    assert np.abs(adapters["dense_0"]["w"]["a"]).max() <= 1 / np.sqrt(8)
    adapters = random_adapters(adapters)
    lstate = lora.set_base(lstate, params)
    x = flat_random.normal(jax.random.key(2), (5, 8))
    a, b = (np.asarray(adapters["dense_0"]["w"][k], np.float64) for k in "ab")
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    xn = np.asarray(x, np.float64)
    h = np.maximum(xn @ p["dense_0"]["w"] + p["dense_0"]["b"] + ALPHA / RANK * (xn @ a) @ b, 0)
    want = h @ p["dense_1"]["w"] + p["dense_1"]["b"]
    y, new_state = apply(adapters, lstate, x)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    assert bits(new_state["base"]) == bits(params)
    # the merge: a plain params tree whose outputs equal the adapted model's, exactly
    merged = lora.merge(params, adapters, alpha=ALPHA)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert bits(merged["dense_1"]) == bits(params["dense_1"])
    np.testing.assert_array_equal(jax.jit(model.apply)(merged, state, x)[0], y)


def test_gradients_reach_the_adapters_alone_as_by_hand(mlp):
    """d loss / d(A, B) of the adapted model equals that of LoRA's forward written out."""
    model, params, _, adapted, _ = mlp
    adapters, lstate = init(adapted, (1, 8), seed=1)
    adapters, lstate = random_adapters(adapters), lora.set_base(lstate, params)
    x = flat_random.normal(jax.random.key(2), (5, 8))
    got = jax.jit(jax.grad(lambda ad: jnp.sum(adapted.apply(ad, lstate, x)[0] ** 2)))(adapters)

    def by_hand(ab):
        a, b = ab
        h = jax.nn.relu(x @ params["dense_0"]["w"] + params["dense_0"]["b"] + ALPHA / RANK * (x @ a) @ b)
        return jnp.sum((h @ params["dense_1"]["w"] + params["dense_1"]["b"]) ** 2)

    ga, gb = jax.jit(jax.grad(by_hand))((adapters["dense_0"]["w"]["a"], adapters["dense_0"]["w"]["b"]))
    np.testing.assert_allclose(got["dense_0"]["w"]["a"], ga, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["dense_0"]["w"]["b"], gb, rtol=1e-4, atol=1e-5)


def test_a_convolution_kernel_is_adapted_as_a_matrix():
    """A >= 3-D leaf is the matrix ``(prod(shape[:-1]), shape[-1])``: the merge by hand."""
    model = models.cnn([4], [], 3, kernel_size=3, nd=1)
    params = jax.eval_shape(lambda k: model.init(k, (1, 10, 2))[0], jax.random.key(0))
    params = jax.tree.map(lambda s: np.random.default_rng(0).normal(size=s.shape).astype(s.dtype), params)
    (path,) = lora.target_paths(params, "conv.*/w")
    adapters = random_adapters(lora.init(jax.random.key(1), params, rank=RANK, targets="conv.*/w"))
    keys = path.split("/")
    w = params[keys[0]][keys[1]]
    ad = adapters[keys[0]][keys[1]]
    assert ad["a"].shape == (3 * 2, RANK) and ad["b"].shape == (RANK, 4)
    merged = lora.merge(params, adapters, alpha=ALPHA)
    np.testing.assert_allclose(merged[keys[0]][keys[1]],
                               w + ALPHA / RANK * (np.asarray(ad["a"]) @ np.asarray(ad["b"])).reshape(w.shape),
                               rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def trained(mlp):
    """Three Adam steps of the adapted MLP through the ordinary train state and step."""
    model, params, _, _, _ = mlp
    adapted = lora.adapt(model, rank=RANK, alpha=ALPHA, targets="dense")
    opt = make_optimizer("adamw", 0.05, weight_decay=0.1)
    state = create_train_state(adapted, opt, jax.random.key(5), (1, 8))
    state = state.replace(model_state=lora.set_base(state.model_state, params))
    start = state
    step = jax.jit(make_train_step(adapted, opt))
    batch = {"x": flat_random.normal(jax.random.key(6), (32, 8)), "y": jnp.arange(32) % 3}
    losses = []
    for _ in range(3):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return adapted, params, start, state, losses


def test_training_moves_the_adapters_alone(trained):
    adapted, params, start, state, losses = trained
    assert bits(state.model_state["base"]) == bits(params)  # the base, bit for bit
    assert losses[-1] < losses[0]
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), start.params, state.params)
    assert all(jax.tree.leaves(moved))
    # the optimiser state holds the adapters' shapes and nothing of the base
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(state.params))
    moment_shapes = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert moment_shapes == sorted(adapter_shapes * 2)  # Adam's mu and nu
    assert sum(x.size for x in jax.tree.leaves(state.params)) == (8 + 16) * RANK + (16 + 3) * RANK


def test_merged_params_predict_as_the_adapted_model(trained, mlp):
    model, params, state0, _, _ = mlp
    adapted, _, _, state, _ = trained
    x = flat_random.normal(jax.random.key(7), (4, 8))
    y, _ = jax.jit(adapted.apply)(state.params, state.model_state, x)
    merged = lora.merge(params, state.params, alpha=ALPHA)
    plain = jax.jit(model.apply)
    np.testing.assert_array_equal(plain(merged, state0, x)[0], y)
    assert not np.allclose(plain(params, state0, x)[0], y)  # the fine-tune changed the function


def test_errors_say_what_was_expected(mlp):
    model, params, _, _, _ = mlp
    with pytest.raises(lora.LoRAError, match=r"matches none .*'dense_0/w', 'dense_1/w'"):
        lora.target_paths(params, "attn")
    with pytest.raises(lora.LoRAError, match="matches none"):  # biases are 1-D: never adapted
        lora.target_paths(params, "/b$")
    with pytest.raises(lora.LoRAError, match="not a regular expression"):
        lora.adapt(model, rank=2, alpha=1.0, targets="dense(")
    with pytest.raises(lora.LoRAError, match="rank must be an int >= 1"):
        lora.adapt(model, rank=0, alpha=1.0, targets="dense")
    with pytest.raises(lora.LoRAError, match=r"dense_0/w: model \(\(8, 16\).*given \(\(8, 4\)"):
        lora.set_base({"base": params, "model": {}}, {**params, "dense_0": {**params["dense_0"], "w": jnp.ones((8, 4))}})
    with pytest.raises(lora.LoRAError, match="not parameters of the model"):
        lora.merge(params, {"conv_0": {"w": {"a": jnp.ones((2, 1)), "b": jnp.ones((1, 2))}}}, alpha=1.0)
    with pytest.raises(lora.LoRAError, match="do not fit"):
        lora.merge(params, {"dense_0": {"w": {"a": jnp.ones((3, 1)), "b": jnp.ones((1, 16))}}}, alpha=1.0)


def test_lora_keys_without_init_from_are_a_config_error():
    from fundl.run.config import ConfigError, validate

    with pytest.raises(ConfigError, match="lora.rank set without lora.init_from"):
        validate({"lora": {"rank": 4}})
    with pytest.raises(ConfigError, match="lora.targets .* is not a regular expression"):
        validate({"lora": {"init_from": "runs/x", "targets": "a("}})


@pytest.mark.slow  # three runs: seconds
def test_fine_tune_a_trained_run_from_the_command_line(tmp_path, capsys, monkeypatch):
    """``[lora]`` through the command line's entry points, in this process (the command line itself,
    exit codes and one-line errors, is tests/test_cli.py's)."""
    from fundl.run.cli import evaluate_main, train_main
    from fundl.train import checkpoint as ckpt

    monkeypatch.chdir(ROOT)
    base, ft = tmp_path / "base", tmp_path / "ft"
    common = ["--config", "configs/tiny_synthetic.toml", "--quiet", "--set", "logging.plots=false"]
    assert train_main(common + ["--run-dir", str(base)]) == 0
    assert train_main(common + ["--run-dir", str(ft), "--set", f"lora.init_from={str(base)!r}", "--set",
                                "lora.rank=2", "--set", "lora.targets='dense_0'", "--set",
                                "optimizer.learning_rate=0.05"]) == 0
    capsys.readouterr()
    assert evaluate_main([str(ft)]) == 0  # rebuilds the adapted model, its base from lora.init_from
    evaluated = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])
    assert train_main(common + ["--run-dir", str(ft) + "-bad", "--set", f"lora.init_from={str(ft)!r}"]) == 2
    assert "its checkpoint step_00000024 does not hold the params" in capsys.readouterr().err  # a LoRA run is no base
    b = ckpt.load_arrays(ckpt.latest_valid(base / "checkpoints"))
    f = ckpt.load_arrays(ckpt.latest_valid(ft / "checkpoints"))
    base_params = {k[len("params/"):]: v for k, v in b.items() if k.startswith("params/")}
    frozen = {k[len("model_state/base/"):]: v for k, v in f.items() if k.startswith("model_state/base/")}
    assert base_params.keys() == frozen.keys()
    assert all(base_params[k].tobytes() == frozen[k].tobytes() for k in frozen)  # bit-identical
    assert sorted(k for k in f if k.startswith("params/")) == ["params/dense_0/w/a", "params/dense_0/w/b"]
    adapter_shapes = sorted(v.shape for k, v in f.items() if k.startswith("params/"))
    moments = sorted(v.shape for k, v in f.items() if k.startswith("opt_state/") and v.ndim)
    assert moments == sorted(adapter_shapes * 2)
    summary = json.loads((ft / "summary.json").read_text())
    assert summary["num_params"] == 16 * 2 + 2 * 16
    assert evaluated["step"] == 24 and evaluated["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-6)
    assert summary["test_loss"] < json.loads((base / "summary.json").read_text())["test_loss"]


@pytest.mark.slow  # a GPT train step compiled: seconds
def test_lora_on_a_gpts_attention_in_bfloat16():
    """Adapters on every block's attention projections, trained with bfloat16 compute: the float32 base
    stays bit-identical, the optimiser holds the adapters alone, and the merge predicts as the model."""
    from fundl.train.optim import matrices_only

    model = models.gpt(11, context=8, layers=2, heads=2, width=16)
    params, state0 = init(model, (1, 8))
    adapted = lora.adapt(model, rank=RANK, alpha=ALPHA, targets=r"attention/(qkv|out)/w$")
    opt = make_optimizer("adamw", 1e-2, b2=0.99, weight_decay=0.1, decay_mask=matrices_only)
    state = create_train_state(adapted, opt, jax.random.key(1), (1, 8))
    state = state.replace(model_state=lora.set_base(state.model_state, params))
    assert sorted(lora.target_paths(params, r"attention/(qkv|out)/w$")) == [
        f"block_{i}/attention/{n}/w" for i in range(2) for n in ("out", "qkv")]
    step = jax.jit(make_train_step(adapted, opt, compute_dtype="bfloat16"))
    ids = jax.random.randint(jax.random.key(2), (4, 9), 0, 11)
    for _ in range(2):
        state, metrics = step(state, {"x": ids[:, :-1], "y": ids[:, 1:]})
    assert bits(state.model_state["base"]) == bits(params)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    moments = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert moments == sorted([x.shape for x in jax.tree.leaves(state.params)] * 2)
    y, _ = jax.jit(adapted.apply)(state.params, state.model_state, ids[:, :-1])
    merged = lora.merge(params, state.params, alpha=ALPHA)
    np.testing.assert_array_equal(jax.jit(model.apply)(merged, state0, ids[:, :-1])[0], y)
