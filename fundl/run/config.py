"""Experiment configs: TOML files checked against one schema before anything runs.

A config has the sections model, data, optimizer, schedule, training,
parallel, logging and privacy.  Every key has a default (``fundl.run.schema``
is the reference for what exists); a file overrides some; ``--set
section.key=value`` overrides again.  Unknown sections or keys are errors that
list the valid keys and the closest match; values of the wrong type are errors
naming the key; settings that contradict each other are errors naming both
(:func:`check_config`, the one place for such rules).  The resolved config is
written back as TOML into the run directory.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import tomllib
from pathlib import Path
from typing import Any

from fundl.run.schema import (  # noqa: F401 - the schema's names, re-exported for config users
    AUTO_OR_FRACTION, AUTO_OR_INT, CHOICE_OR_INT, CHOICES, INT_OR_INT_LIST, NON_NEGATIVE, OPTIMIZERS, POSITIVE,
    RESUME_KINDS, SCHEMA, resume_kind,
)


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def type_name(value) -> str:
    """The name config errors give a value's type (``"string"``, ``"list"``, ``"int"``, ...)."""
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list"}.get(type(value), type(value).__name__)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int_or_list(where: str, value):
    """A positive int, or a non-empty list of positive ints (``model.kernel_size``)."""
    ints = list(value) if isinstance(value, (list, tuple)) else [value]
    if not ints or not all(_is_int(v) and v > 0 for v in ints):
        raise ConfigError(f"{where} must be a positive int or a non-empty list of positive ints (one per layer), "
                          f"got {type_name(value)} {value!r}")
    return list(value) if isinstance(value, (list, tuple)) else value


def _check_choice_or_int(where: str, value, choices):
    """One of ``choices`` or an int >= 0 (``model.padding``)."""
    if _is_int(value) and value >= 0 or value in choices:
        return value
    raise ConfigError(f"{where} must be one of {list(choices)} or an int >= 0, got {type_name(value)} {value!r}."
                      f"{_closest(str(value).upper(), choices)}")


def _check_value(section: str, key: str, value, source: str):
    default = SCHEMA[section][key]
    where = f"{section}.{key}" + (f" (in {source})" if source else "")
    if (section, key) in INT_OR_INT_LIST:
        return _check_int_or_list(where, value)
    if (section, key) in CHOICE_OR_INT:
        return _check_choice_or_int(where, value, CHOICES[(section, key)])
    if (section, key) in AUTO_OR_FRACTION:
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ConfigError(f"{where} must be \"auto\" or a number in [0, 1), got {type_name(value)} {value!r}")
        return float(value)
    if (section, key) in AUTO_OR_INT:
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be \"auto\" or an int, got {type_name(value)} {value!r}")
        default = 0
    want = type(default)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is list and isinstance(value, tuple):
        value = list(value)
    if type(value) is not want:
        raise ConfigError(f"{where} must be of type {type_name(default)} (like {default!r}), got {type_name(value)} {value!r}")
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
    """Merge ``raw`` over the defaults, checking every section, key and value, then the rules
    between keys (:func:`check_config`)."""
    config = copy.deepcopy(SCHEMA)
    for section, entries in raw.items():
        if section not in SCHEMA:
            raise ConfigError(
                f"unknown config section [{section}]{' in ' + source if source else ''}; "
                f"valid sections: {sorted(SCHEMA)}.{_closest(section, SCHEMA)}"
            )
        if not isinstance(entries, dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {type_name(entries)}")
        for key, value in entries.items():
            if key not in SCHEMA[section]:
                raise ConfigError(
                    f"unknown key '{section}.{key}'{' in ' + source if source else ''}; valid keys of "
                    f"[{section}]: {sorted(SCHEMA[section])}.{_closest(key, SCHEMA[section])}"
                )
            config[section][key] = _check_value(section, key, value, source)
    _check_ranges(config)
    check_config(config)
    return config


def _check_ranges(config: dict) -> None:
    """Bounds of single keys that the schema's POSITIVE / NON_NEGATIVE sets do not express."""
    opt = config["optimizer"]
    if opt["learning_rate"] <= 0:
        raise ConfigError(f"optimizer.learning_rate must be > 0, got {opt['learning_rate']}")
    if not config["privacy"]["delta"] < 1.0:
        raise ConfigError(f"privacy.delta is a probability in (0, 1), got {config['privacy']['delta']}")
    for key in ("dropout", "input_dropout"):
        if not 0.0 <= config["model"][key] < 1.0:
            raise ConfigError(f"model.{key} is a drop probability in [0, 1), got {config['model'][key]}")


def check_config(config: dict, *, overwrite: bool = False) -> None:
    """Every rule that relates config keys to each other, each a ConfigError naming the keys.

    :func:`validate` calls it, so a loaded config has passed it; the runner
    calls it again with ``overwrite`` (``--overwrite``, which a fresh run
    cannot combine with ``training.resume``).  Checks that need the machine
    or the data (device counts, the dataset's size, the run's length in steps
    when set in epochs) stay where that is known: the placement, DP-SGD's
    set-up (``fundl.run.privacy``) and the schedule (``fundl.run.optimizer``).
    """
    m, o, t, p = config["model"], config["optimizer"], config["training"], config["privacy"]
    # how long the run is
    if t["epochs"] == 0 and t["steps"] == 0:
        raise ConfigError("training.epochs and training.steps are both 0: set one of them to a positive number")
    # the schedule
    sched = config["schedule"]
    if len(sched["boundaries"]) != len(sched["scales"]):
        raise ConfigError(
            f"schedule.boundaries ({len(sched['boundaries'])} values) and schedule.scales "
            f"({len(sched['scales'])} values) must have the same length")
    # what the model kind can honour
    kind = m["kind"]
    if m["input_dropout"] and kind != "mlp":
        raise ConfigError(f"model.input_dropout applies to model.kind='mlp' only, got kind={kind!r}; "
                          f"use model.dropout (on hidden features) instead")
    if m["remat"] and kind not in ("mlp", "rnn", "char_lm", "gpt"):
        raise ConfigError(f"model.remat applies to model.kind 'mlp', 'rnn', 'char_lm' and 'gpt', got {kind!r}")
    if m["residual"] and kind != "mlp":
        raise ConfigError(f"model.residual applies to model.kind='mlp' only, got kind={kind!r}; "
                          f"set model.residual = 0")
    if m["residual"] and not m["hidden"]:
        raise ConfigError(f"model.residual = {m['residual']} blocks need a hidden layer of the width they keep, "
                          f"got model.hidden = []; give e.g. model.hidden = [100]")
    if kind == "gpt" and m["width"] % m["heads"]:
        raise ConfigError(f"model.heads = {m['heads']} must divide model.width = {m['width']} (each head gets "
                          f"width / heads features)")
    sizes = m["kernel_size"]
    if isinstance(sizes, list) and kind in ("cnn", "cnn1d") and len(sizes) != len(m["channels"]):
        raise ConfigError(f"model.kernel_size must be an int or one size per conv layer: expected "
                          f"{len(m['channels'])} sizes (model.channels = {m['channels']}), got {len(sizes)}: "
                          f"{sizes}")
    # momentum, nesterov and Adam's betas reach the optimiser named, or are errors
    _check_momentum(o)
    # ensembles and sweeps
    if t["sweep"] and t["ensemble"] > 1:
        raise ConfigError(f"training.ensemble = {t['ensemble']} with training.sweep: sweep the seed instead "
                          f"(--sweep training.seed=0,1,...)")
    # what DP-SGD cannot honour (docs/privacy.md)
    if p["enabled"]:
        if t["ensemble"] > 1 or t["sweep"]:
            raise ConfigError("privacy.enabled with training.ensemble > 1 or training.sweep: every member would "
                              "train on the same data and their privacy costs add up, which one epsilon per "
                              "run does not report; train one model per DP run")
        if not config["data"]["shuffle"]:
            raise ConfigError("privacy.enabled with data.shuffle = false: DP-SGD draws every batch by Poisson "
                              "sampling (its privacy accounting needs it), so there is no fixed order to keep; "
                              "set data.shuffle = true")
        if m["batch_norm"]:
            raise ConfigError("privacy.enabled with model.batch_norm = true: batch norm normalises each example "
                              "with statistics of its whole batch, so per-example gradients (and their clipping) "
                              "are not defined; set model.batch_norm = false (nn.layer_norm / nn.group_norm "
                              "normalise per example)")
        if t["compute_dtype"] == "float16":
            raise ConfigError("privacy.enabled with training.compute_dtype = 'float16': DP-SGD does not support "
                              "float16 loss scaling; use 'float32' or 'bfloat16'")
    # LoRA fine-tuning (fundl/run/lora.py)
    _check_lora(config["lora"])
    # the command line's --overwrite
    if overwrite and t["resume"]:
        raise ConfigError("--overwrite starts afresh and --resume continues the run: choose one")


def _check_momentum(o: dict) -> None:
    """``optimizer.momentum`` / ``nesterov`` / ``b1`` / ``b2``, when set, must be arguments of
    ``optax.<optimizer.name>``."""
    name = o["name"]
    betas = [key for key in ("b1", "b2") if o[key] != "auto"]
    if name not in OPTIMIZERS or not (o["momentum"] or o["nesterov"] or betas):
        return  # an unknown name is refused when the optimiser is built (fundl.run.optimizer)
    from fundl.train.optim import accepted_options  # imports optax: only for configs that set these

    takes = accepted_options(name)
    for key in ("momentum", "nesterov", *betas):
        value = o[key]
        if (value or key in betas) and key not in takes:
            hint = " (it takes b1 for its first moment)" if key == "momentum" and "b1" in takes else ""
            takers = [n for n in OPTIMIZERS if key in accepted_options(n)]
            shown = str(value).lower() if isinstance(value, bool) else value
            raise ConfigError(f"optimizer.{key}={shown} is not used by optax.{name}{hint}; "
                              f"optimisers that take {key}: {', '.join(takers)}")
    if o["nesterov"] and "momentum" in takes and not o["momentum"]:
        raise ConfigError(f"optimizer.nesterov=true needs optimizer.momentum > 0 for optax.{name} "
                          "(with no momentum optax ignores nesterov); set e.g. optimizer.momentum=0.9")


def _check_lora(c: dict) -> None:
    """``[lora]`` keys take effect only with ``lora.init_from``; ``lora.targets`` must be a regex."""
    if not c["init_from"]:
        set_ = [f"lora.{k}" for k in ("rank", "alpha", "targets") if c[k] != SCHEMA["lora"][k]]
        if set_:
            raise ConfigError(f"{', '.join(set_)} set without lora.init_from: name the run directory to fine-tune "
                              f"(lora.init_from = \"runs/NAME\")")
        return
    import re

    try:
        re.compile(c["targets"])
    except re.error as e:
        raise ConfigError(f"lora.targets = {c['targets']!r} is not a regular expression ({e})") from None


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
