"""Resuming a run without silently changing it: the resume policy.

:func:`resume` restores the newest valid checkpoint of a run directory.  A
checkpoint records the resolved config it was trained with.  When a run
resumes, every difference between that config and the new one is
classified by ``fundl.run.schema.RESUME_KINDS``:

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

import sys
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

from fundl.run import config as cfg
from fundl.run import distributed
from fundl.run.build import total_steps_of
from fundl.run.optimizer import schedule_from_config
from fundl.run.rundir import RunDir
from fundl.train import checkpoint as ckpt


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
    for key in ("optimizer.weight_decay", "optimizer.clip_norm", "optimizer.nesterov", "optimizer.b1", "optimizer.b2"):
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


# ------------------------------------------------------------------ restore
class Resumed(NamedTuple):
    """What a run continues from: the restored ``state`` (or the template, with no checkpoint),
    the run's ``run_id`` and the ``step`` it restarts at."""

    state: Any
    run_id: str
    step: int


def resume(rd: RunDir, state, config: dict, loader, allow_changes: Sequence[str] = (), *, verbose: bool = True,
           new_run_id: str = "", placement=None) -> Resumed:
    """The state to continue from: the newest valid checkpoint of ``rd``, restored into ``state``
    (the template), after checking what the config changes (see the module doc).  With a
    ``placement`` the leaves are restored straight onto its devices and shardings
    (``placement.restore_target``; each process reads only its shards), else onto the default device.

    Every process must find the same checkpoint step (checked through the
    distributed runtime): a process that cannot see the run's checkpoints
    stops the run with an error instead of silently starting at step 0.
    """
    path = ckpt.latest_valid(rd.checkpoint_dir)
    step = -1 if path is None else ckpt.step_of(path)
    steps = distributed.gather_ints(step)
    if len(set(steps)) > 1:
        seen = ", ".join(f"process {i}: {'no checkpoint' if s < 0 else f'step {s}'}" for i, s in enumerate(steps))
        raise ckpt.CheckpointError(
            f"cannot resume {rd.path}: the processes of this run do not see the same checkpoints ({seen}). "
            f"The run directory must be on a filesystem every process shares (or hold the same checkpoints)")
    if path is None:
        if verbose:
            print(f"fundl: no checkpoint in {rd.checkpoint_dir}; starting from step 0", flush=True)
        return Resumed(state, new_run_id, 0)
    manifest = ckpt.read_manifest(path, verify=False)
    extras = manifest.get("extras", {})
    saved = extras.get("config")
    if saved is None:  # a checkpoint from before configs were recorded in it
        saved = cfg.load_config(rd.path / "config.toml") if (rd.path / "config.toml").is_file() else config
    where = str(rd.path)
    changes = config_changes(saved, config)
    check_changes(changes, allow_changes, where, privacy=config["privacy"]["enabled"])
    step = int(manifest["step"])
    expected = loader.state_at_step(step)
    mismatch = loader_mismatch(extras.get("loader"), expected)
    if mismatch and not any(c.name in DATA_ORDER_KEYS for c in changes):
        raise ckpt.CheckpointError(
            f"cannot resume {where}: the data position saved in {path} does not match the one recomputed "
            f"from step {step} with the same config ({mismatch}); the data order would differ from the "
            f"saved run's. Was the dataset or fundl's loader changed?")
    target = placement.restore_target(state) if placement is not None else state
    restored, _ = ckpt.restore(path, target)
    if verbose:
        print(f"fundl: resuming from {path} (step {step})", flush=True)
    new_total = total_steps_of(config, loader.steps_per_epoch)
    if changes and rd.writer:  # said even when quiet (on stderr): the run differs from the checkpoint's
        old_loader = extras.get("loader") or expected
        old_total = total_steps_of(saved, max(1, old_loader["num_examples"] // old_loader["batch_size"]))
        lines = [f"resume changes {c} ({c.kind})" for c in changes]
        lines += describe_effects([c for c in changes if c.kind == "trajectory"], saved, config,
                                  step=step, old_total=old_total, new_total=new_total)
        print("\n".join(f"fundl: {line}" for line in lines), file=sys.stderr, flush=True)
        rd.log({"step": step, "split": "resume", "changes": {c.name: [c.old, c.new] for c in changes}})
    if step > new_total:
        raise cfg.ConfigError(
            f"cannot resume {rd.path}: its checkpoint is at step {step}, past the {new_total} steps "
            f"this config asks for; raise training.steps or training.epochs")
    return Resumed(restored, extras.get("run_id") or new_run_id, step)
