"""Experiment configs: TOML files checked against one schema before anything runs.

A config has the sections model, data, optimizer, schedule, training,
parallel, logging and privacy.  Every key has a default (the schema below is the
reference for what exists); a file overrides some; ``--set section.key=value``
overrides again.  Unknown sections or keys are errors that list the valid
keys and the closest match; values of the wrong type are errors naming the
key.  The resolved config is written back as TOML into the run directory.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import tomllib
from pathlib import Path
from typing import Any

# section -> key -> default value.  A default's type is the key's type
# (ints are accepted where floats are expected; a list default takes lists).
SCHEMA: dict[str, dict[str, Any]] = {
    "model": {
        "kind": "mlp",            # mlp | cnn (2D) | cnn1d | rnn | char_lm
        "hidden": [128],          # mlp widths / dense widths after the conv stack
        "residual": 0,            # mlp: blocks h + activation(dense(h)) of the last hidden width, after it
        "channels": [32, 64],     # conv channels per block
        "kernel_size": 3,         # an int for every conv layer, or a list: one per layer
        "stride": 1,
        "padding": "SAME",        # SAME | VALID | an int p (p zeros on both sides, torch's padding=p)
        "pool": "avg",            # avg | max | none: 2x pooling after each conv block
        "batch_norm": False,
        "dropout": 0.0,           # drop probability after each hidden layer (not on the raw inputs)
        "input_dropout": 0.0,     # mlp: drop probability on the inputs (0: inputs are never dropped)
        "remat": False,           # mlp / rnn / char_lm: recompute activations in the backward pass (less memory)
        "activation": "relu",
        "cell": "lstm",           # rnn / char_lm: lstm | gru
        "rnn_hidden": 128,
        "num_layers": 1,
        "bidirectional": False,
        "readout": "last",        # rnn: last | mean (over all outputs) | flatten (all outputs, flattened)
        "embed_dim": 64,          # char_lm
        "init": "default",        # default (fundl's) | torch (PyTorch's defaults; fundl/models.py)
    },
    "data": {
        "name": "mnist1d",        # mnist1d | mnist | fashion_mnist | shakespeare | synthetic
        "dir": "",                # data folder; default FUNDL_DATA_DIR and the usual places
        "num_train": 0,           # synthetic: examples (0 = dataset default)
        "num_test": 0,
        "seq_len": 64,            # shakespeare windows
        "flatten": False,         # feed (N, prod(shape)) to the model
        "prefetch": 2,            # batches prefetched by a background thread (0: off)
        "shuffle": True,          # reshuffle the training set every epoch (false: batches in array order)
    },
    "optimizer": {
        "name": "adam",           # one of fundl.train.optim.OPTIMIZERS (docs/optimizers.md)
        "learning_rate": 1e-3,
        "momentum": 0.0,          # sgd / rmsprop (an error elsewhere: see docs/optimizers.md)
        "nesterov": False,        # sgd / rmsprop (with momentum) and the adam family
        "weight_decay": 0.0,      # decoupled, scaled by the learning rate, for every optimiser
        "clip_norm": 0.0,         # global-norm clipping (0: off)
        "accumulate_steps": 1,    # gradient accumulation via optax.MultiSteps
    },
    "schedule": {
        "name": "constant",       # constant | cosine | warmup_cosine | exponential | piecewise
        "warmup_steps": 0,
        "end_value": 0.0,
        "decay_rate": 0.1,
        "transition_steps": 0,
        "boundaries": [],
        "scales": [],
    },
    "training": {
        "seed": 0,
        "batch_size": 128,
        "eval_batch_size": 1000,
        "epochs": 1,
        "steps": 0,               # > 0 overrides epochs
        "eval_every": 0,          # steps between evaluations (0: only at the end)
        "log_every": 50,          # steps between host transfers of metrics
        "checkpoint_every": 0,    # steps between checkpoints (0: only at the end)
        "keep_checkpoints": 3,
        "async_checkpoints": True,  # write checkpoints in the background while training goes on
        "resume": False,          # continue from the run directory's latest checkpoint
        "compute_dtype": "float32",  # float32 | bfloat16 | float16
        "loss_scale": 0.0,        # 0: the dtype's default (float16 needs one)
        "steps_per_call": "auto",  # K optimiser steps fused into one dispatch; "auto": measured per model family
        "unroll": "auto",         # lax.scan unroll for fused steps (0: fully); "auto": measured per model family
        "nan_policy": "stop",     # stop | skip | ignore
        "progress": True,         # tqdm bar when stderr is a terminal
        "ensemble": 1,            # members trained together (vmap); member i uses seed + i
        "sweep": [],              # ["section.key=v1,v2,..."]: one member per point (fundl/sweeps.py)
    },
    "parallel": {
        "mode": "none",           # none | pmap | sharding | fsdp (parameters and optimiser state split too)
        "devices": 0,             # 0: all local devices
        "member_devices": 1,      # sharding + ensemble: mesh rows holding members (1: members replicated)
        "model_devices": 1,       # fsdp: a data x model mesh with this many columns (rules may use 'model')
        "rules": [],              # fsdp: [[REGEX, [AXIS_OR_EMPTY, ...]], ...] by tree path; first match wins
        "fsdp_min_size": 1024,    # fsdp: leaves with fewer elements stay replicated
    },
    "logging": {
        "plots": True,            # curves.png at the end
        "tensorboard": False,     # event files via tensorboardX when installed
    },
    "privacy": {                  # DP-SGD (docs/privacy.md)
        "enabled": False,
        "clip_norm": 1.0,         # per-example gradients clipped to this global L2 norm
        "noise_multiplier": 1.0,  # Gaussian noise std on the clipped sum, in units of clip_norm
        "delta": 1e-5,            # epsilon is reported for this delta
        "sampling": "poisson",    # each example in each step's batch with probability batch_size / N
        "accountant": "pld",      # pld | rdp (dp-accounting)
    },
}

CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("model", "kind"): ("mlp", "cnn", "cnn1d", "rnn", "char_lm"),
    ("model", "pool"): ("avg", "max", "none"),
    ("model", "padding"): ("SAME", "VALID"),
    ("model", "cell"): ("lstm", "gru"),
    ("model", "readout"): ("last", "mean", "flatten"),
    ("model", "init"): ("default", "torch"),
    ("model", "activation"): ("relu", "gelu", "tanh", "silu", "elu", "sigmoid"),
    ("schedule", "name"): ("constant", "cosine", "warmup_cosine", "exponential", "piecewise"),
    ("training", "compute_dtype"): ("float32", "bfloat16", "float16"),
    ("training", "nan_policy"): ("stop", "skip", "ignore"),
    ("parallel", "mode"): ("none", "pmap", "sharding", "fsdp"),
    ("privacy", "sampling"): ("poisson",),
    ("privacy", "accountant"): ("pld", "rdp"),
}

# Keys that take "auto" or an int (their default is "auto").
AUTO_OR_INT = {("training", "steps_per_call"), ("training", "unroll")}
# Keys that take a positive int or a non-empty list of them (their default is an int).
INT_OR_INT_LIST = {("model", "kernel_size")}
# Keys that take one of their CHOICES or an int >= 0 (their default is a string).
CHOICE_OR_INT = {("model", "padding")}

POSITIVE = {("training", "batch_size"), ("training", "eval_batch_size"), ("training", "log_every"),
            ("training", "steps_per_call"), ("training", "keep_checkpoints"),
            ("optimizer", "accumulate_steps"), ("model", "stride"),
            ("training", "ensemble"), ("parallel", "member_devices"), ("parallel", "model_devices"),
            ("model", "rnn_hidden"), ("model", "num_layers"), ("model", "embed_dim"), ("data", "seq_len"),
            ("privacy", "clip_norm"), ("privacy", "delta")}
NON_NEGATIVE = {("training", "epochs"), ("training", "steps"), ("training", "eval_every"), ("model", "residual"),
                ("training", "checkpoint_every"), ("training", "unroll"), ("training", "loss_scale"),
                ("optimizer", "weight_decay"), ("optimizer", "clip_norm"), ("optimizer", "momentum"),
                ("data", "num_train"), ("data", "num_test"), ("data", "prefetch"), ("parallel", "devices"),
                ("parallel", "fsdp_min_size"),
                ("schedule", "warmup_steps"), ("schedule", "transition_steps"), ("privacy", "noise_multiplier")}


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def _type_name(value) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list"}.get(type(value), type(value).__name__)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int_or_list(where: str, value):
    """A positive int, or a non-empty list of positive ints (``model.kernel_size``)."""
    ints = list(value) if isinstance(value, (list, tuple)) else [value]
    if not ints or not all(_is_int(v) and v > 0 for v in ints):
        raise ConfigError(f"{where} must be a positive int or a non-empty list of positive ints (one per layer), "
                          f"got {_type_name(value)} {value!r}")
    return list(value) if isinstance(value, (list, tuple)) else value


def _check_choice_or_int(where: str, value, choices):
    """One of ``choices`` or an int >= 0 (``model.padding``)."""
    if _is_int(value) and value >= 0 or value in choices:
        return value
    raise ConfigError(f"{where} must be one of {list(choices)} or an int >= 0, got {_type_name(value)} {value!r}."
                      f"{_closest(str(value).upper(), choices)}")


def _check_value(section: str, key: str, value, source: str):
    default = SCHEMA[section][key]
    where = f"{section}.{key}" + (f" (in {source})" if source else "")
    if (section, key) in INT_OR_INT_LIST:
        return _check_int_or_list(where, value)
    if (section, key) in CHOICE_OR_INT:
        return _check_choice_or_int(where, value, CHOICES[(section, key)])
    if (section, key) in AUTO_OR_INT:
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be \"auto\" or an int, got {_type_name(value)} {value!r}")
        default = 0
    want = type(default)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is list and isinstance(value, tuple):
        value = list(value)
    if type(value) is not want:
        raise ConfigError(f"{where} must be of type {_type_name(default)} (like {default!r}), got {_type_name(value)} {value!r}")
    if want is float and not math.isfinite(value):
        raise ConfigError(f"{where} must be finite, got {value!r}")
    choices = CHOICES.get((section, key))
    if choices and value not in choices:
        raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}.{_closest(str(value), choices)}")
    if (section, key) in POSITIVE and value <= 0:
        raise ConfigError(f"{where} must be > 0, got {value!r}")
    if (section, key) in NON_NEGATIVE and value < 0:
        raise ConfigError(f"{where} must be >= 0, got {value!r}")
    return value


def validate(raw: dict, source: str = "") -> dict:
    """Merge ``raw`` over the defaults, checking every section, key and value."""
    config = copy.deepcopy(SCHEMA)
    for section, entries in raw.items():
        if section not in SCHEMA:
            raise ConfigError(
                f"unknown config section [{section}]{' in ' + source if source else ''}; "
                f"valid sections: {sorted(SCHEMA)}.{_closest(section, SCHEMA)}"
            )
        if not isinstance(entries, dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {_type_name(entries)}")
        for key, value in entries.items():
            if key not in SCHEMA[section]:
                raise ConfigError(
                    f"unknown key '{section}.{key}'{' in ' + source if source else ''}; valid keys of "
                    f"[{section}]: {sorted(SCHEMA[section])}.{_closest(key, SCHEMA[section])}"
                )
            config[section][key] = _check_value(section, key, value, source)
    _check_consistency(config)
    return config


def _check_consistency(config: dict) -> None:
    t = config["training"]
    if t["epochs"] == 0 and t["steps"] == 0:
        raise ConfigError("training.epochs and training.steps are both 0: set one of them to a positive number")
    opt = config["optimizer"]
    if opt["learning_rate"] <= 0:
        raise ConfigError(f"optimizer.learning_rate must be > 0, got {opt['learning_rate']}")
    sched = config["schedule"]
    if len(sched["boundaries"]) != len(sched["scales"]):
        raise ConfigError(
            f"schedule.boundaries ({len(sched['boundaries'])} values) and schedule.scales "
            f"({len(sched['scales'])} values) must have the same length")
    if not config["privacy"]["delta"] < 1.0:
        raise ConfigError(f"privacy.delta is a probability in (0, 1), got {config['privacy']['delta']}")
    for key in ("dropout", "input_dropout"):
        if not 0.0 <= config["model"][key] < 1.0:
            raise ConfigError(f"model.{key} is a drop probability in [0, 1), got {config['model'][key]}")


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"section.key=value"`` -> (section, key, value); value parsed as TOML, else a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    path, raw = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    """Read a TOML file (or start from defaults), apply ``section.key=value`` overrides, validate."""
    raw: dict = {}
    source = ""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
        source = str(path)
    validate(raw, source)  # report file errors against the file before overrides
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    if overrides:
        source = f"{source} with --set overrides" if source else "--set overrides"
    return validate(raw, source)


def toml_value(value) -> str:
    """``value`` as TOML writes it (``"cosine"``, ``[16, 8]``, ``true``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dumps(config: dict) -> str:
    """The config as TOML text (round-trips through ``tomllib``)."""
    lines = []
    for section, entries in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in entries.items()]
        lines.append("")
    return "\n".join(lines)


# How a difference between a checkpoint's config and the config of the run
# that resumes it is treated (fundl/train/resume.py):
#   "structure":  the model, the shape of the train state or the numbers it holds
#                 mean something else -> refused;
#   "trajectory": the rest of the run's numbers (schedule, length, data order,
#                 seed) -> refused unless allowed explicitly (--allow-change KEY),
#                 then its effect is printed;
#   "cosmetic":   how the run is observed, stored or placed -> allowed, printed.
# A section maps to one kind, or to {key: kind} for its keys.
RESUME_KINDS: dict[str, str | dict[str, str]] = {
    "model": {**{k: "structure" for k in SCHEMA["model"]}, "remat": "cosmetic"},  # remat: same values, less memory
    "data": {"name": "structure", "seq_len": "structure", "flatten": "structure", "shuffle": "trajectory",
             "num_train": "trajectory", "num_test": "trajectory", "dir": "cosmetic", "prefetch": "cosmetic"},
    "optimizer": {"name": "structure", "momentum": "structure", "accumulate_steps": "structure",
                  "nesterov": "trajectory", "learning_rate": "trajectory", "weight_decay": "trajectory",
                  "clip_norm": "trajectory"},
    "schedule": "trajectory",
    "training": {"seed": "trajectory", "batch_size": "trajectory", "epochs": "trajectory",
                 "steps": "trajectory", "nan_policy": "structure", "compute_dtype": "structure",
                 "loss_scale": "structure", "eval_batch_size": "cosmetic", "eval_every": "cosmetic",
                 "log_every": "cosmetic", "checkpoint_every": "cosmetic", "keep_checkpoints": "cosmetic",
                 "async_checkpoints": "cosmetic",
                 "resume": "cosmetic", "steps_per_call": "cosmetic", "unroll": "cosmetic",
                 "progress": "cosmetic", "ensemble": "structure", "sweep": "structure"},
    "parallel": "cosmetic",  # every placement trains the same run (tests/test_parallel.py)
    "logging": "cosmetic",
    # A run's epsilon is accounted for the whole run with one noise multiplier and sampling:
    # changing those mid-run would make the reported epsilon wrong, so they are refused.
    "privacy": {"enabled": "structure", "sampling": "structure", "noise_multiplier": "structure",
                "clip_norm": "trajectory", "delta": "cosmetic", "accountant": "cosmetic"},
}


def resume_kind(section: str, key: str) -> str:
    """``"structure"``, ``"trajectory"`` or ``"cosmetic"``: see RESUME_KINDS."""
    kind = RESUME_KINDS[section]
    return kind if isinstance(kind, str) else kind[key]
