"""Ensembles and sweeps from a config: who the members are and whether they share one program.

``training.ensemble = N`` trains N members, member ``i`` with seed ``seed + i``.
``training.sweep`` (``--sweep KEY=V1,V2,...`` on the command line, repeatable)
trains one member per point of the cartesian product of the values.  Seeds
and the optimiser settings the optimiser state can hold
(``fundl.run.optimizer.injectable``: the learning rate, and the weight decay of
optimisers that take it) vary *inside one compiled program* — a vmapped train
state (``fundl.train.ensemble``); any other swept setting (a width, the batch
size, the model kind, a schedule) changes shapes or structure, so then every
point runs as a separate run in ``RUN_DIR/members/<k>/`` (``fundl.run.experiment``
runs them one after another).  Either way the run directory gets ``sweep.csv``,
``sweep.md`` and ``sweep.png`` (every member's curves, the best marked), and
``summary.json`` lists the members (``fundl.run.summary``).
"""

from __future__ import annotations

import itertools

from fundl.run import config as cfg
from fundl.run.config import parse_sweep  # noqa: F401 - where a sweep's text is read (and checked), re-exported
from fundl.run.optimizer import injectable


def sweep_of(config: dict) -> dict[str, list]:
    """``training.sweep`` as ``{key: values}`` (insertion order kept; a key twice is an error)."""
    out = {}
    for text in config["training"]["sweep"]:
        key, values = parse_sweep(text)
        if key in out:
            raise cfg.ConfigError(f"training.sweep names {key} twice")
        out[key] = values
    return out


def with_overrides(config: dict, overrides: dict) -> dict:
    """``config`` with ``{"section.key": value}`` applied, validated as any config."""
    raw = {section: dict(entries) for section, entries in config.items()}
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        raw[section][name] = value
    raw["training"]["sweep"] = []
    raw["training"]["ensemble"] = 1
    return cfg.validate(raw, source=f"sweep member {overrides}")


def members(config: dict) -> list[dict]:
    """One dict of overrides per member (``{}`` for a plain run's single member).  (A config
    never has both: ``training.ensemble`` with ``training.sweep`` fails validation.)"""
    n, sweep = config["training"]["ensemble"], sweep_of(config)
    if sweep:
        return [dict(zip(sweep, combo)) for combo in itertools.product(*sweep.values())]
    seed = config["training"]["seed"]
    return [{"training.seed": seed + i} for i in range(n)] if n > 1 else [{}]


def in_one_program(config: dict) -> tuple[bool, list[str]]:
    """Whether the members can share one compiled program, and the swept keys that prevent it."""
    sweep = sweep_of(config)
    ok = {"training.seed"} | {f"optimizer.{k}" for k in injectable(config)}
    separate = [k for k in sweep if k not in ok]
    return not separate, separate


def injected(config: dict) -> tuple[str, ...]:
    """The optimiser settings a one-program sweep keeps as per-member arrays."""
    return tuple(k.split(".", 1)[1] for k in sweep_of(config) if k.startswith("optimizer."))


def describe_member(member: dict) -> str:
    """``"learning_rate=0.1, seed=2"`` for a member's overrides (``"the config's"`` for none)."""
    return ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in member.items()) or "the config's"
