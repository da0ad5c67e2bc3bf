"""Config validation: unknown keys, wrong types, impossible values, overrides, round trip."""

import tomllib

import pytest

from fundl.run import config as cfg


def test_defaults_validate_and_round_trip_through_toml():
    c = cfg.load_config(None)
    assert tomllib.loads(cfg.dumps(c)) == c


def test_every_shipped_config_validates():
    from pathlib import Path

    files = sorted(Path(__file__).resolve().parent.parent.glob("configs/*.toml"))
    assert len(files) >= 5
    for f in files:
        cfg.load_config(f)


def test_misspelled_key_lists_valid_keys_and_suggests_closest():
    with pytest.raises(cfg.ConfigError) as err:
        cfg.validate({"training": {"batchsize": 32}})
    msg = str(err.value)
    assert "training.batchsize" in msg and "Did you mean 'batch_size'?" in msg and "eval_every" in msg


def test_unknown_section_suggests_closest():
    with pytest.raises(cfg.ConfigError, match=r"\[optimiser\].*Did you mean 'optimizer'"):
        cfg.validate({"optimiser": {"name": "adam"}})


def test_wrong_type_names_the_key():
    with pytest.raises(cfg.ConfigError, match=r"training\.batch_size must be of type int.*got string '32'"):
        cfg.validate({"training": {"batch_size": "32"}})
    with pytest.raises(cfg.ConfigError, match=r"model\.hidden must be of type list"):
        cfg.validate({"model": {"hidden": 128}})


def test_impossible_values_name_the_key():
    with pytest.raises(cfg.ConfigError, match=r"training\.batch_size must be > 0"):
        cfg.validate({"training": {"batch_size": 0}})
    with pytest.raises(cfg.ConfigError, match=r"model\.dropout is a drop probability"):
        cfg.validate({"model": {"dropout": 1.5}})
    with pytest.raises(cfg.ConfigError, match=r"parallel\.mode must be one of .*Did you mean 'pmap'"):
        cfg.validate({"parallel": {"mode": "pmapp"}})
    with pytest.raises(cfg.ConfigError, match="both 0"):
        cfg.validate({"training": {"epochs": 0, "steps": 0}})


def test_ints_are_accepted_for_floats():
    assert cfg.validate({"optimizer": {"learning_rate": 1}})["optimizer"]["learning_rate"] == 1.0


def test_overrides_parse_toml_values_and_fall_back_to_strings(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[model]\nkind = "mlp"\n')
    c = cfg.load_config(f, ["training.batch_size=64", "model.hidden=[32, 16]", "model.kind=cnn1d",
                            "training.compute_dtype=bfloat16"])
    assert c["training"]["batch_size"] == 64 and c["model"]["hidden"] == [32, 16]
    assert c["model"]["kind"] == "cnn1d" and c["training"]["compute_dtype"] == "bfloat16"
    with pytest.raises(cfg.ConfigError, match="section.key=value"):
        cfg.load_config(f, ["batch_size=3"])


def test_file_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[training]\nbatch_sise = 3\n")
    with pytest.raises(cfg.ConfigError, match="bad.toml"):
        cfg.load_config(f)
    f.write_text("[training\n")
    with pytest.raises(cfg.ConfigError, match="not valid TOML"):
        cfg.load_config(f)
    with pytest.raises(cfg.ConfigError, match="does not exist"):
        cfg.load_config(tmp_path / "missing.toml")


def test_every_setting_says_how_a_resume_may_change_it():
    kinds = {cfg.resume_kind(section, key) for section, keys in cfg.SCHEMA.items() for key in keys}
    assert kinds == {"structure", "trajectory", "cosmetic"}
    assert cfg.resume_kind("model", "hidden") == "structure"
    assert cfg.resume_kind("schedule", "name") == cfg.resume_kind("training", "epochs") == "trajectory"
    assert cfg.resume_kind("optimizer", "learning_rate") == cfg.resume_kind("training", "seed") == "trajectory"
    assert cfg.resume_kind("logging", "plots") == cfg.resume_kind("training", "progress") == "cosmetic"
    for section, kind in cfg.RESUME_KINDS.items():  # a per-key table names exactly the schema's keys
        assert isinstance(kind, str) or set(kind) == set(cfg.SCHEMA[section]), section


def test_input_dropout_is_a_probability_and_only_for_the_mlp():
    from fundl.run.build import build_model

    with pytest.raises(cfg.ConfigError, match=r"model.input_dropout is a drop probability in \[0, 1\), got 1.0"):
        cfg.load_config(None, ["model.input_dropout=1.0"])
    with pytest.raises(cfg.ConfigError, match="model.input_dropout applies to model.kind='mlp' only"):
        cfg.load_config(None, ['model.kind="cnn1d"', "model.input_dropout=0.2"])  # a rule between keys
    import jax
    import numpy as np

    model = build_model(cfg.load_config(None, ["model.input_dropout=0.5"])["model"], 10)  # wired
    params, state, _ = model.init(jax.random.key(0), (4, 12))
    x = np.ones((4, 12), np.float32)
    train, _ = model.apply(params, state, x, key=jax.random.key(1), train=True)
    test, _ = model.apply(params, state, x)
    assert not np.allclose(train, test)  # model.dropout is 0: only the inputs were dropped


def test_model_remat_is_wired_and_changes_no_value():
    import jax
    import numpy as np

    from fundl.run.build import build_model

    for kind in ('"mlp"', '"rnn"'):
        plain = build_model(cfg.load_config(None, [f"model.kind={kind}", "model.rnn_hidden=8"])["model"], 3)
        remat = build_model(cfg.load_config(None, [f"model.kind={kind}", "model.rnn_hidden=8",
                                                   "model.remat=true"])["model"], 3)
        shape = (2, 5, 4)
        params, state, _ = plain.init(jax.random.key(0), shape)
        x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        loss = lambda m: jax.jit(jax.grad(lambda p: m.apply(p, state, x)[0].sum()))(params)
        for a, b in zip(jax.tree.leaves(loss(plain)), jax.tree.leaves(loss(remat))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(cfg.ConfigError, match="model.remat applies to"):
        build_model(cfg.load_config(None, ['model.kind="cnn1d"', "model.remat=true"])["model"], 3)
    assert cfg.resume_kind("model", "remat") == "cosmetic"


@pytest.mark.parametrize("raw, match", [
    ({"training": {"epochs": 0, "steps": 0}}, r"training\.epochs and training\.steps are both 0"),
    ({"schedule": {"name": "piecewise", "boundaries": [10], "scales": []}},
     r"schedule\.boundaries \(1 values\) and schedule\.scales \(0 values\)"),
    ({"model": {"kind": "rnn", "input_dropout": 0.1}}, r"model\.input_dropout applies to model\.kind='mlp' only"),
    ({"model": {"kind": "cnn", "remat": True}}, r"model\.remat applies to model\.kind 'mlp', 'rnn', 'char_lm' and 'gpt'"),
    ({"model": {"kind": "cnn1d", "residual": 1}}, r"model\.residual applies to model\.kind='mlp' only"),
    ({"model": {"hidden": [], "residual": 2}}, r"model\.residual = 2 blocks need a hidden layer"),
    ({"model": {"kind": "cnn", "channels": [4, 8], "kernel_size": [3]}}, r"model\.kernel_size must be an int or one"),
    ({"optimizer": {"name": "adam", "momentum": 0.9}}, r"optimizer\.momentum=0\.9 is not used by optax\.adam"),
    ({"optimizer": {"name": "sgd", "nesterov": True}}, r"optimizer\.nesterov=true needs optimizer\.momentum > 0"),
    ({"training": {"ensemble": 2, "sweep": ["training.seed=0,1"]}}, r"training\.ensemble = 2 with training\.sweep"),
    ({"privacy": {"enabled": True}, "training": {"ensemble": 2}}, r"privacy\.enabled with training\.ensemble > 1"),
    ({"privacy": {"enabled": True}, "data": {"shuffle": False}}, r"privacy\.enabled with data\.shuffle = false"),
    ({"privacy": {"enabled": True}, "model": {"batch_norm": True}}, r"privacy\.enabled with model\.batch_norm"),
    ({"privacy": {"enabled": True}, "training": {"compute_dtype": "float16"}},
     r"privacy\.enabled with training\.compute_dtype = 'float16'"),
])
def test_every_rule_between_keys_lives_in_check_config_and_runs_on_validation(raw, match):
    with pytest.raises(cfg.ConfigError, match=match):
        cfg.validate(raw)
    config = cfg.load_config(None)
    for section, entries in raw.items():
        config[section].update(entries)
    with pytest.raises(cfg.ConfigError, match=match):
        cfg.check_config(config)  # the same rule, from the one function


def test_overwrite_and_resume_contradict_each_other():
    config = cfg.load_config(None, ["training.resume=true"])
    cfg.check_config(config)
    with pytest.raises(cfg.ConfigError, match="--overwrite starts afresh and --resume continues the run: choose one"):
        cfg.check_config(config, overwrite=True)
    cfg.check_config(cfg.load_config(None), overwrite=True)


def test_validating_a_config_imports_no_jax():
    """The command line validates before JAX loads (a config error costs no JAX import); only a
    config that sets optimizer.momentum or nesterov asks optax what its optimiser takes."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from fundl.run import config as cfg; cfg.load_config('configs/mnist1d_cnn.toml'); "
            "print([m for m in ('jax', 'optax', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.strip() == "[]"
