"""The MNIST-1D paper's models (configs/mnist1d_paper_*.toml) and the options they need:
residual MLP blocks, per-layer kernel sizes and int padding, the "flatten" RNN readout,
PyTorch-default initialisation (model.init = "torch")."""

import math
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fundl.run import config as cfg
from fundl import models, nn
from fundl.run.build import build_model
from fundl.interop import gru_params_from_torch
from fundl.nn import flat_random
from conftest import ROOT

KEY = jax.random.key(0)
X = flat_random.normal(jax.random.key(1), (4, 40, 1))
PAPER = {  # config -> the parameter count of the paper's PyTorch model (notebooks/models.py)
    "logistic": 410, "mlp": 15_210, "cnn": 5_210, "gru": 5_134}


def _init_params(model, shape, key=KEY):
    """``model.init``'s params (eager: measured faster here than one jitted init per model)."""
    return model.init(key, shape)[0]


def _paper_model(name: str):
    config = cfg.load_config(ROOT / "configs" / f"mnist1d_paper_{name}.toml")
    return build_model(config["model"], 10), config


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_build_the_papers_models(name):
    """Parameter counts equal the PyTorch models'; init's shape is apply's (traced abstractly: the
    numbers are checked against PyTorch below); the training settings are the paper's (Adam 1e-2,
    batch 100, 6000 steps, constant, no weight decay)."""
    model, config = _paper_model(name)
    params, state, out = nn.abstract_init(model, X.shape)
    y, _ = jax.eval_shape(model.apply, params, state, X)
    assert sum(math.prod(p.shape) for p in jax.tree.leaves(params)) == PAPER[name]
    assert out == y.shape == (4, 10)
    o, t = config["optimizer"], config["training"]
    assert (o["name"], o["learning_rate"], o["weight_decay"], t["batch_size"], t["steps"]) == (
        "adam", 0.01, 0.0, 100, 6000)
    assert config["schedule"]["name"] == "constant" and config["model"]["init"] == "torch"
    assert config["data"]["shuffle"] is False  # the paper's loop takes batches in order


def test_train_py_prints_each_paper_models_own_published_number():
    """Logistic regression is an MLP with no hidden layer: its reference is the paper's 32%, not the MLP's 68%."""
    from fundl.run.summary import published_reference

    got = {name: published_reference(_paper_model(name)[1])[1] for name in PAPER}
    assert got == {"logistic": 0.32, "mlp": 0.68, "cnn": 0.94, "gru": 0.91}


CONTRACT = {  # small versions of each new option, through the generic layer checks
    "residual_mlp_remat": (models.mlp([8], 3, residual=1, remat=True), (2, 6)),
    "cnn1d_kernels_int_padding_torch": (
        models.cnn1d([3, 4], [], 2, kernel_size=[5, 3], stride=2, padding=1, pool="none", init="torch"), (2, 12, 1)),
    "bigru_flatten_torch": (models.rnn_classifier("gru", 3, 2, bidirectional=True, readout="flatten", init="torch"),
                            (2, 5, 1)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_new_options_pass_the_layer_contract(name):
    """init's shape is apply's; abstract init, jit, vmap and grad agree (tests/layer_checks.py)."""
    from layer_checks import check_layer

    model, shape = CONTRACT[name]
    check_layer(model, shape)


# ----------------------------------------------------------- numerics
@pytest.mark.slow
def test_residual_mlp_equals_numpy():
    model = models.mlp([8], 3, residual=2)
    params, state, _ = model.init(KEY, (5, 6))
    x = np.asarray(flat_random.normal(KEY, (5, 6)))
    relu = lambda v: np.maximum(v, 0)
    lin = lambda p, v: v @ np.asarray(p["w"]) + np.asarray(p["b"])
    h = relu(lin(params["dense_0"], x))
    for k in range(2):
        h = h + relu(lin(params[f"residual_{k}"]["dense_0"], h))
    y, _ = model.apply(params, state, jnp.asarray(x))
    np.testing.assert_allclose(y, lin(params["dense_1"], h), rtol=1e-5, atol=1e-5)


def _paper_torch_model(name):
    """The paper's PyTorch model as fundl/run/reproduce_mnist1d.py retypes it (its reference runs use it)."""
    from fundl.run.reproduce_mnist1d import paper_torch_model

    return paper_torch_model(name)


def _linear(m):
    return {"w": jnp.asarray(m.weight.detach().numpy().T), "b": jnp.asarray(m.bias.detach().numpy())}


def _conv(m):  # torch (out, in, k) -> fundl (k, in, out)
    return {"w": jnp.asarray(m.weight.detach().numpy().transpose(2, 1, 0)), "b": jnp.asarray(m.bias.detach().numpy())}


def _cnn_readout(m, length=5, channels=25):
    """torch flattens (channel, time), fundl (time, channel): permute the readout's rows."""
    w = m.weight.detach().numpy().T.reshape(channels, length, -1).transpose(1, 0, 2).reshape(length * channels, -1)
    return {"w": jnp.asarray(w), "b": jnp.asarray(m.bias.detach().numpy())}


@pytest.mark.slow
def test_paper_models_equal_the_papers_pytorch_code_on_ported_weights():
    """notebooks/models.py of github.com/greydanus/mnist1d (retyped in scripts/reproduce_mnist1d.py)
    with its weights ported: the same outputs (the CNN's readout rows permuted)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    x = np.array(X)
    sd = lambda m: {k: v.numpy() for k, v in m.state_dict().items()}
    tl, tm, tc, tg = (_paper_torch_model(name) for name in ("logistic", "mlp", "cnn", "gru"))
    ported = {
        "logistic": (tl, {"dense_0": _linear(tl)}),
        "mlp": (tm, {"dense_0": _linear(tm.linear1), "residual_0": {"dense_0": _linear(tm.linear2)},
                     "dense_1": _linear(tm.linear3)}),
        "cnn": (tc, {"conv1d_0": _conv(tc.conv1), "conv1d_1": _conv(tc.conv2), "conv1d_2": _conv(tc.conv3),
                     "dense_0": _cnn_readout(tc.linear)}),
        "gru": (tg, {"gru": {"forward": gru_params_from_torch(sd(tg.gru), 0, "forward"),
                             "backward": gru_params_from_torch(sd(tg.gru), 0, "backward")},
                     "dense_0": _linear(tg.linear)}),
    }
    for name, (module, params) in ported.items():
        model, _ = _paper_model(name)
        template, state, _ = nn.abstract_init(model, X.shape)
        assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, template), name
        with torch.no_grad():
            want = module(torch.from_numpy(x[..., 0])).numpy()  # the paper feeds (N, 40)
        got, _ = model.apply(params, state, X)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


# ---------------------------------------------------------------- init
def _dense_and_conv(params, path=()):
    """(path, {"w", "b"}) for every dense/conv param dict in a params tree."""
    if isinstance(params, dict) and "w" in params and "b" in params and not isinstance(params["w"], dict):
        yield path, params
        return
    for k, v in params.items():
        if isinstance(v, dict):
            yield from _dense_and_conv(v, path + (k,))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_torch_init_draws_weights_and_biases_uniform_within_one_over_sqrt_fan_in(name):
    """Every weight and bias in U(±1/sqrt(fan_in)): all inside the bound, spread to it, std
    bound/sqrt(3) (fan_in = inputs x kernel); fundl's default has zero biases instead."""
    model, config = _paper_model(name)
    params = _init_params(model, X.shape)
    layers = list(_dense_and_conv(params))
    assert len(layers) == {"mlp": 3, "cnn": 4}[name]
    for path, p in layers:
        bound = 1 / math.sqrt(math.prod(p["w"].shape[:-1]))
        for leaf in (p["w"], p["b"]):
            a = np.abs(np.asarray(leaf))
            assert a.max() <= bound and (a.size < 100 or a.max() > 0.9 * bound), (path, a.max(), bound)
        w = np.asarray(p["w"])
        if w.size > 1000:
            assert abs(w.std() - bound / math.sqrt(3)) < 0.05 * bound, path
    default = _init_params(build_model({**config["model"], "init": "default"}, 10), X.shape)
    assert all(not np.any(np.asarray(p["b"])) for _, p in _dense_and_conv(default))


@pytest.mark.slow
def test_torch_init_matches_torchs_own_draws():
    """torch's nn.Linear/nn.Conv1d draws lie within the same bounds and have the same spread."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    for module, fundl_layer, shape in [
        (torch.nn.Linear(125, 10), nn.dense(10), (2, 125)),
        (torch.nn.Conv1d(25, 25, 3), nn.conv1d(25, 3), (2, 10, 25)),
    ]:
        params = _init_params(nn.init.torch_default(fundl_layer), shape)
        for theirs, ours in ((module.weight, params["w"]), (module.bias, params["b"])):
            theirs, ours = np.abs(theirs.detach().numpy()), np.abs(np.asarray(ours))
            bound = 1 / math.sqrt(math.prod(params["w"].shape[:-1]))
            assert theirs.max() <= bound and ours.max() <= bound
            if theirs.size > 1000:
                assert abs(theirs.mean() - ours.mean()) < 0.05 * bound


@pytest.mark.slow
def test_torch_init_gives_the_lstm_torchs_forget_bias():
    """fundl's default adds 1 to the LSTM's forget-gate bias; init="torch" does not (the GRU is
    torch's either way)."""
    H = 16
    bias = {}
    for init in ("default", "torch"):
        params = _init_params(models.rnn_classifier("lstm", H, 3, init=init), (2, 5, 4))
        bias[init] = np.asarray(params["lstm"]["b"])
    bound = 2 / math.sqrt(H)  # b_ih + b_hh, each U(±1/sqrt(H))
    assert np.abs(bias["torch"]).max() <= bound
    np.testing.assert_allclose(bias["default"][H:2 * H], bias["torch"][H:2 * H] + 1, rtol=1e-6)
    gru = [_init_params(models.rnn_classifier("gru", H, 3, init=i), (2, 5, 4))["gru"] for i in ("default", "torch")]
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), *gru))


@pytest.mark.slow
def test_default_init_and_defaults_leave_existing_models_unchanged():
    """init="default", residual=0, an int kernel size: the params of the models before these options."""
    cases = [
        (models.mlp([16], 3), nn.serial(nn.flatten(), nn.dense(16), nn.relu, nn.dense(3), name="mlp"), (2, 6)),
        (models.cnn1d([4, 4], [8], 3, kernel_size=3),
         nn.serial(nn.conv1d(4, 3), nn.relu, nn.avg_pool1d(2), nn.conv1d(4, 3), nn.relu, nn.avg_pool1d(2),
                   nn.flatten(), nn.dense(8), nn.relu, nn.dense(3)), (2, 12, 1)),
    ]
    for model, before, shape in cases:
        new, old = _init_params(model, shape), _init_params(before, shape)
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), new, old))


# --------------------------------------------------------- cnn options
def test_per_layer_kernel_sizes_and_int_padding_give_torchs_output_lengths():
    """Conv1d(k, stride 2, padding 1) lengths: (L + 2 - k) // 2 + 1, i.e. 40 -> 19 -> 10 -> 5."""
    model = models.cnn1d([3, 4, 5], [], 2, kernel_size=[5, 3, 3], stride=2, padding=1, pool="none")
    params, state, out = nn.abstract_init(model, (2, 40, 1))
    assert [params[f"conv1d_{i}"]["w"].shape for i in range(3)] == [(5, 1, 3), (3, 3, 4), (3, 4, 5)]
    assert params["dense_0"]["w"].shape == (25, 2)
    assert jax.eval_shape(model.apply, params, state, X[:2])[0].shape == out == (2, 2)
    model2d = models.cnn([2, 3], [], 2, kernel_size=[5, 3], padding=2, pool="none")
    p2, _, out2 = nn.abstract_init(model2d, (2, 8, 8, 1))
    assert p2["conv2d_0"]["w"].shape == (5, 5, 1, 2) and out2 == (2, 2)
    p3, _, _ = nn.abstract_init(models.cnn([2, 3], [], 2, kernel_size=(3, 1), pool="none"), (2, 8, 8, 1))
    assert [p3[f"conv2d_{i}"]["w"].shape for i in range(2)] == [(3, 1, 1, 2), (3, 1, 2, 3)]  # a tuple: every layer's
    with pytest.raises(ValueError, match=r"one size per conv layer \(3 for channels=\[3, 4, 5\]\), got 2"):
        models.cnn1d([3, 4, 5], [], 2, kernel_size=[5, 3])


@pytest.mark.slow
def test_flatten_readout_feeds_every_steps_output_in_time_order():
    model = models.rnn_classifier("gru", 3, 2, bidirectional=True, readout="flatten")
    params, state, out = model.init(KEY, (4, 7, 1))
    assert params["dense_0"]["w"].shape == (7 * 6, 2) and out == (4, 2)
    seq = nn.gru(3, bidirectional=True)
    ys, _ = seq.apply(params["gru"], {}, X[:, :7])
    y, _ = model.apply(params, state, X[:, :7])
    np.testing.assert_allclose(y, ys.reshape(4, -1) @ params["dense_0"]["w"] + params["dense_0"]["b"], rtol=1e-5)


# -------------------------------------------------------------- config
def test_new_keys_round_trip_through_toml_and_overrides():
    c = cfg.load_config(None, ["model.kernel_size=[5,3,3]", "model.padding=1", "model.residual=2",
                               "model.init=torch", "model.readout=flatten"])
    assert (c["model"]["kernel_size"], c["model"]["padding"], c["model"]["residual"]) == ([5, 3, 3], 1, 2)
    assert cfg.validate(tomllib.loads(cfg.dumps(c))) == c
    d = cfg.load_config(None)["model"]
    assert (d["kernel_size"], d["padding"], d["residual"], d["init"], d["readout"]) == (3, "SAME", 0, "default", "last")


@pytest.mark.parametrize("setting, message", [
    ({"kernel_size": [5, 0, 3]}, (r"model\.kernel_size must be a positive int or a non-empty list of positive "
                                  r"ints \(one per layer\), got list \[5, 0, 3\]")),
    ({"kernel_size": []}, r"model\.kernel_size must be .* got list \[\]"),
    ({"kernel_size": 2.5}, r"model\.kernel_size must be .* got float 2\.5"),
    ({"padding": -1}, r"model\.padding must be one of \['SAME', 'VALID'\] or an int >= 0, got int -1"),
    ({"padding": "same"}, r"model\.padding must be one of .*got string 'same'\. Did you mean 'SAME'\?"),
    ({"padding": True}, r"model\.padding must be .* got bool True"),
    ({"residual": -1}, r"model\.residual must be >= 0, got -1"),
    ({"readout": "flat"}, r"model\.readout must be one of \['last', 'mean', 'flatten'\], got 'flat'"),
    ({"init": "pytorch"}, r"model\.init must be one of \['default', 'torch'\], got 'pytorch'.*Did you mean 'torch'"),
])
def test_bad_values_are_config_errors_saying_expected_got_where(setting, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.validate({"model": setting})
    with pytest.raises(cfg.ConfigError, match=r"\(in paper\.toml\)"):
        cfg.validate({"model": setting}, "paper.toml")


@pytest.mark.parametrize("setting, message", [
    ({"kind": "cnn1d", "residual": 1}, r"model\.residual applies to model\.kind='mlp' only, got kind='cnn1d'"),
    ({"kind": "mlp", "hidden": [], "residual": 1}, r"model\.residual = 1 blocks need a hidden layer.*got model\.hidden = \[\]"),
    ({"kind": "cnn1d", "channels": [25, 25, 25], "kernel_size": [5, 3]},
     (r"model\.kernel_size must be an int or one size per conv layer: expected 3 sizes "
      r"\(model\.channels = \[25, 25, 25\]\), got 2: \[5, 3\]")),
])
def test_settings_the_model_kind_cannot_honour_are_config_errors(setting, message):
    with pytest.raises(cfg.ConfigError, match=message):  # rules between keys: fundl.run.config.check_config
        build_model(cfg.validate({"model": setting})["model"], 10)


def test_data_shuffle_false_reaches_the_training_loader(monkeypatch):
    """``data.shuffle`` is handed to every member's Loader (false: batches in array order, as the
    paper's loop takes them); DP-SGD, which samples by Poisson, refuses it."""
    from fundl.run import experiment

    seen = []

    class Stop(Exception):
        pass

    def loader(*args, **kw):
        seen.append(kw["shuffle"])
        raise Stop

    monkeypatch.setattr(experiment, "Loader", loader)
    for shuffle in (False, True):
        config = cfg.validate({"data": {"name": "synthetic", "num_train": 64, "num_test": 16, "shuffle": shuffle},
                               "model": {"hidden": [4]}, "training": {"steps": 1, "batch_size": 8}})
        with pytest.raises(Stop):
            experiment.train(config, _NoRunDir(), experiment.placement_from_config(config), verbose=False)
    assert seen == [False, True]
    with pytest.raises(cfg.ConfigError, match=r"privacy\.enabled with data\.shuffle = false.*set data\.shuffle = true"):
        cfg.validate({"data": {"shuffle": False}, "privacy": {"enabled": True}})  # fundl.run.config.check_config


class _NoRunDir:
    """Enough of a RunDir for ``experiment.train`` to reach its loaders."""

    writer, moved_to = False, None


def test_resuming_with_another_data_order_or_init_is_checked():
    """data.shuffle changes the data order (allowed with --allow-change, its effect said); the
    model keys fix the train state (refused); a checkpoint's config without the new keys has
    their defaults (no change)."""
    from fundl.run.resume import check_changes, config_changes, describe_effects

    saved = cfg.validate({})
    changes = config_changes(saved, cfg.validate({"data": {"shuffle": False}}))
    assert [(c.name, c.kind) for c in changes] == [("data.shuffle", "trajectory")]
    with pytest.raises(cfg.ConfigError, match="data.shuffle"):
        check_changes(changes, (), "runs/x")
    check_changes(changes, ("data.shuffle",), "runs/x")
    effects = describe_effects(changes, saved, cfg.validate({"data": {"shuffle": False}}), step=5, old_total=10,
                               new_total=10)
    assert any("data order" in line for line in effects)
    with pytest.raises(cfg.ConfigError, match="cannot resume"):
        check_changes(config_changes(saved, cfg.validate({"model": {"init": "torch"}})), ("model",), "runs/x")
    old = {s: {k: v for k, v in e.items() if k not in ("residual", "init", "shuffle")} for s, e in saved.items()}
    assert config_changes(old, saved) == []


@pytest.mark.slow
def test_paper_cnn_config_runs_five_unrolled_steps_per_dispatch_through_fit(tmp_path):
    """The paper CNN's config overrides "auto" (one step per dispatch for convolutions) by
    measurement (docs/benchmarks.md, "End to end"): ``fit`` runs its 5 fused steps fully
    unrolled, never as a rolled scan over convolutions (far slower on XLA:CPU: docs/benchmarks.md)."""
    from fundl.run import experiment

    config = cfg.load_config(ROOT / "configs" / "mnist1d_paper_cnn.toml",
                             ["training.steps=12", "training.log_every=6", "training.eval_every=12"])
    summary = experiment.run(config, tmp_path / "run", verbose=False)
    assert (summary["steps_per_call"], summary["unroll"]) == (5, True)
    assert summary["final_step"] == 12  # dispatches of 5, 1, 5, 1 steps: fused calls end at the logs
