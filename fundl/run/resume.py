"""Resuming a run without silently changing it.

A checkpoint records the resolved config it was trained with.  When a run
resumes, every difference between that config and the new one is
classified by ``fundl.config.RESUME_KINDS``:

* **structure** (the model, the optimiser's kind and state, the dtype):
  refused, the message lists the keys;
* **trajectory** (schedule, learning rate, steps/epochs, batch size, seed,
  data): refused unless each key is allowed explicitly
  (``--allow-change training.epochs``, or a whole section such as
  ``--allow-change schedule``); then its effect on the run is spelled out,
  e.g. "the cosine schedule is re-spanned from 400 to 6000 steps; the
  learning rate at step 400 becomes 0.0099 (was 1.5e-07)";
* **cosmetic** (logging, intervals, progress, placement): allowed and listed.

The loader position saved in the checkpoint is checked against the one
recomputed from the step, so a data order that would differ from the
saved run's is an error unless a trajectory change explains it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from fundl import config as cfg
from fundl.train.optim import schedule_from_config


# Settings whose change moves the data order (the loader's position is then recomputed from the step).
DATA_ORDER_KEYS = ("training.seed", "training.batch_size", "data.num_train", "data.shuffle")


@dataclass(frozen=True)
class Change:
    """One setting that differs between the checkpoint's config and this run's."""

    section: str
    key: str
    old: Any
    new: Any

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def kind(self) -> str:
        return cfg.resume_kind(self.section, self.key)

    def __str__(self) -> str:
        return f"{self.name}: {cfg.toml_value(self.old)} -> {cfg.toml_value(self.new)}"


def config_changes(saved: dict, config: dict) -> list[Change]:
    """Every setting of ``config`` that differs from ``saved`` (both resolved configs), except
    ``training.resume`` (how a run continues, not what it runs)."""
    out = []
    for section, entries in cfg.SCHEMA.items():
        for key in entries:
            if (section, key) == ("training", "resume"):
                continue
            old = saved.get(section, {}).get(key, entries[key])
            new = config[section][key]
            if old != new:
                out.append(Change(section, key, old, new))
    return out


def check_allowed_names(allowed: Sequence[str]) -> None:
    """Each ``--allow-change`` entry must name a section or a ``section.key`` of the schema."""
    for name in allowed:
        section, _, key = name.partition(".")
        if section not in cfg.SCHEMA or (key and key not in cfg.SCHEMA[section]):
            raise cfg.ConfigError(
                f"--allow-change {name!r} names no setting; give a section ({', '.join(cfg.SCHEMA)}) "
                f"or section.key, e.g. training.epochs")


def _allowed(change: Change, allowed: Sequence[str]) -> bool:
    return change.name in allowed or change.section in allowed


# With DP-SGD one epsilon is reported for the whole run, computed from one sampling rate
# (batch size / training examples): changing either mid-run would make it wrong.
PRIVACY_FIXED = ("training.batch_size", "data.num_train")


def check_changes(changes: Sequence[Change], allowed: Sequence[str], where: str, privacy: bool = False) -> None:
    """Raise ConfigError for structure changes and for trajectory changes not in ``allowed``
    (with ``privacy``, also for changes of the sampling rate: PRIVACY_FIXED)."""
    fixed = [c for c in changes if privacy and c.name in PRIVACY_FIXED]
    if fixed:
        raise cfg.ConfigError(
            f"cannot resume {where}: a DP-SGD run reports one epsilon computed from one sampling rate "
            f"(batch size / training examples), and these settings change it:\n  " + "\n  ".join(map(str, fixed)) +
            "\nUndo them, or start a new run")
    structure = [c for c in changes if c.kind == "structure"]
    if structure:
        raise cfg.ConfigError(
            f"cannot resume {where}: the config changes the model, the optimiser's kind or the train state "
            f"the checkpoint holds:\n  " + "\n  ".join(map(str, structure)) +
            "\nUndo these changes, or start a new run (--run-dir NEW_DIR) from scratch")
    refused = [c for c in changes if c.kind == "trajectory" and not _allowed(c, allowed)]
    if refused:
        flags = " ".join(f"--allow-change {c.name}" for c in refused)
        raise cfg.ConfigError(
            f"cannot resume {where} as asked: these settings differ from the checkpoint's and would change "
            f"the rest of the run:\n  " + "\n  ".join(map(str, refused)) +
            f"\nUndo them to continue the run exactly, or confirm each with {flags}")


def describe_effects(changes: Sequence[Change], saved: dict, config: dict, *, step: int,
                     old_total: int, new_total: int) -> list[str]:
    """Plain-language lines on what the allowed trajectory changes do to the run from ``step``."""
    names = {c.name for c in changes}
    lines = []
    if old_total != new_total:
        lines.append(f"the run now ends at step {new_total} (was {old_total})")
    lr_keys = {"optimizer.learning_rate"} | {f"schedule.{k}" for k in cfg.SCHEMA["schedule"]}
    if names & lr_keys or (old_total != new_total and config["schedule"]["name"] != "constant"):
        old_lr = float(schedule_from_config(saved, old_total)(step))
        new_lr = float(schedule_from_config(config, new_total)(step))
        name = config["schedule"]["name"]
        span = (f"the {name} schedule is re-spanned from {old_total} to {new_total} steps; "
                if old_total != new_total and name != "constant" and not names & lr_keys else "")
        lines.append(f"{span}the learning rate at step {step} becomes {new_lr:.6g} (was {old_lr:.6g})")
    if names & set(DATA_ORDER_KEYS):
        lines.append(f"the data order from step {step} on differs from the saved run's (batches of "
                     f"{config['training']['batch_size']}, seed {config['training']['seed']}, position "
                     f"recomputed from the step); params, optimiser state and PRNG key come from the checkpoint")
    if "data.num_test" in names:
        lines.append("evaluations from now on use a different test set")
    for key in ("optimizer.weight_decay", "optimizer.clip_norm", "optimizer.nesterov"):
        if key in names:
            lines.append(f"{key} takes its new value from step {step} on")
    return lines


def loader_mismatch(saved: dict | None, expected: dict) -> str | None:
    """Why the loader position saved in a checkpoint differs from the one recomputed from its step
    (None when it matches or when the checkpoint stored none)."""
    if not saved:
        return None
    diff = [f"{k}: saved {saved[k]!r}, recomputed {expected.get(k)!r}" for k in sorted(saved)
            if saved[k] != expected.get(k)]
    return "; ".join(diff) or None
