"""From a validated config to a finished run directory: what ``fundl-train`` runs.

:func:`run` claims the run directory and trains: one program (a plain run, an
ensemble, or a sweep whose members share one compiled program: :func:`train`),
or, for a sweep over settings that change shapes, one run per point in
``RUN_DIR/members/<k>/`` (:func:`run_separately`).  :func:`train` reads top to
bottom in sections: data, model and state, resume, steps, fit, summary.  Each
piece is an ordinary fundl function built in ``fundl.run.build``; this module
only wires them as the config says.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Sequence

import jax

from fundl.data import Dataset, Loader
from fundl.run import sweeps
from fundl.run.build import (
    check_batch_fits, check_data, initial_state, load_data, placement_from_config, sharded_layout, total_steps_of, train_step_for,
)
from fundl.run.config import ConfigError, check_config, dumps, validate
from fundl.run.errors import with_resume_hint
from fundl.run.evaluator import make_evaluator
from fundl.run.optimizer import injectable
from fundl.run.privacy import dp_setup
from fundl.run.resume import check_allowed_names, resume
from fundl.run.rundir import RunDir, open_run_dir, plot_curves, read_metrics
from fundl.run.summary import member_row, members_summary, one_program_rows, separate_runs_summary
from fundl.train.ensemble import MemberLoaders
from fundl.train.checkpoint import Checkpointer
from fundl.train.fusion import Fusion
from fundl.train.loop import Every, fit
from fundl.train.signals import TrainingInterrupted
from fundl.train.state import count_params


def run(config: dict, run_dir: str | os.PathLike, *, config_path: str = "", verbose: bool = True,
        overwrite: bool = False, allow_changes: Sequence[str] = ()) -> dict:
    """Train and evaluate as ``config`` says, writing the run directory; return the summary.

    ``overwrite``: a fresh run into a directory holding an earlier run moves
    that run aside (else it is refused).  ``allow_changes``: settings (or
    sections) a resumed run may change although they alter its trajectory
    (``fundl.run.resume``).
    """
    config = validate(config)  # the one validator, also for a dict from the Python API
    check_config(config, overwrite=overwrite)
    check_allowed_names(allow_changes)
    one_program, separate = sweeps.in_one_program(config)
    placement = placement_from_config(config)
    with open_run_dir(run_dir, config, overwrite=overwrite) as rd:
        if rd.moved_to is not None:  # said even when quiet: files moved
            print(f"fundl: moved the earlier run in {rd.path} aside to {rd.moved_to}", file=sys.stderr, flush=True)
        if not one_program:
            return run_separately(config, rd, separate, config_path=config_path, verbose=verbose)
        return train(config, rd, placement, config_path=config_path, verbose=verbose, allow_changes=allow_changes)


def train(config: dict, rd: RunDir, placement, *, config_path: str = "", verbose: bool = True,
          allow_changes: Sequence[str] = ()) -> dict:
    """One program's run of ``config`` into the claimed run directory ``rd`` on ``placement``
    (``fundl.run.build.placement_from_config``); return the summary."""
    t = config["training"]
    say = verbose and rd.writer

    # ------------------------------------------------------------------ data
    data = load_data(config)
    check_data(config, data)  # labels, finite inputs, a batch the data can fill: once, before training
    try:
        placement.check_batch_size(t["batch_size"])
    except ValueError as e:
        raise ConfigError(f"training.batch_size: {e}") from None
    members = sweeps.members(config)  # [{}] for a plain run
    loaders = [Loader(data.train, t["batch_size"], seed=m.get("training.seed", t["seed"]), drop_last=True,
                      shuffle=config["data"]["shuffle"], prefetch=config["data"]["prefetch"],
                      process_index=jax.process_index(), process_count=jax.process_count()) for m in members]
    dp = dp_setup(config, data, placement)  # None unless [privacy] enabled (docs/privacy.md)
    loader = dp.loader if dp is not None else MemberLoaders(loaders) if len(members) > 1 else loaders[0]
    total = total_steps_of(config, loader.steps_per_epoch)

    # --------------------------------------------------------- model and state
    model, optimizer, state = initial_state(config, data, loader.steps_per_epoch, axis_name=placement.axis_name)
    num_params = count_params(state.params) // len(members)  # of one member
    layout = sharded_layout(placement, state)  # fsdp: each leaf's split, checked before training

    # ---------------------------------------------------------------- resume
    run_id, start = uuid.uuid4().hex[:12], 0
    if t["resume"]:
        state, run_id, start = resume(rd, state, config, loader, allow_changes, verbose=say, new_run_id=run_id,
                                      placement=placement)
    rd.write_text("config.toml", dumps(config))  # what is actually being run
    rd.truncate_metrics(start)

    # ----------------------------------------------------------------- steps
    train_step = train_step_for(config, model, optimizer, dp=dp, axis_name=placement.axis_name,
                                members=len(members))
    eval_fn = make_evaluator(config, model, data, placement, len(members), warm_state=state)
    if dp is not None:
        eval_fn = dp.with_epsilon(eval_fn)  # eval records in metrics.jsonl carry epsilon and delta

    # ------------------------------------------------------------------- fit
    if say:
        _announce(config, data, members, num_params, total, start, rd, placement, layout)
    every = Every(log=t["log_every"], eval=t["eval_every"], checkpoint=t["checkpoint_every"])
    with Checkpointer(rd.checkpoint_dir, keep=t["keep_checkpoints"], async_save=t["async_checkpoints"],
                      extras={"config": config, "run_id": run_id}) as checkpoints:
        try:
            result = fit(state, train_step, loader, num_steps=total, eval_fn=eval_fn, every=every,
                         checkpoints=checkpoints, fusion=Fusion(t["steps_per_call"], t["unroll"]),
                         nan_policy=t["nan_policy"], placement=placement, on_log=rd.log, progress=t["progress"])
        except TrainingInterrupted as e:
            raise with_resume_hint(e, rd.path) from None

    # --------------------------------------------------------------- summary
    final = result.final_eval
    summary = {
        "final_step": total,
        "epochs": total / loader.steps_per_epoch,
        "test_accuracy": final.get("accuracy"),
        "test_loss": final.get("loss"),
        "train_seconds": result.train_seconds,
        "examples_per_second": result.examples_per_second,
        "compile_seconds": result.compile_seconds,  # of train_seconds
        "num_params": num_params,
        "config_path": str(config_path),
        "dataset": data.name,
        "model": config["model"]["kind"],
        "compute_dtype": t["compute_dtype"],
        "devices": placement.num_devices,
        "processes": jax.process_count(),
        "run_id": run_id,
        "steps_per_call": result.steps_per_call,  # what "auto" resolved to
        "unroll": result.unroll,
        **layout,
    }
    if result.skipped_updates is not None:
        summary["skipped_updates"] = result.skipped_updates  # nan_policy="skip"
    if dp is not None:
        summary.update(dp.summary(total))  # epsilon, delta, and what they were computed from
        if say:
            print(f"fundl: {dp.describe(total)}", flush=True)
    if len(members) > 1 or t["sweep"]:
        rows, histories = one_program_rows(config, members, result.history, result.train_seconds)
        summary.update(members_summary(config, rows, histories, result.history, rd))
    rd.write_summary(summary)
    if rd.writer and config["logging"]["plots"]:
        plot_curves(rd.path)
    return summary


def _announce(config, data, members, num_params, total, start, rd, placement, layout) -> None:
    """The run's banner (and, under fsdp, how the train state is split)."""
    if layout:
        per_device, whole = layout["state_bytes_per_device"], layout["state_bytes"]
        print(f"fundl: fsdp: train state {per_device / 2**20:.2f} MiB per device of {whole / 2**20:.2f} MiB "
              f"({per_device / whole:.2f}x)"
              + ("; nothing is split: no float leaf has parallel.fsdp_min_size elements and a dimension divisible "
                 f"by the {placement.data_devices} data devices" if per_device == whole and placement.data_devices > 1
                 else ""), flush=True)
    who = (f"{len(members)} members ({', '.join(map(sweeps.describe_member, members))}) of "
           if len(members) > 1 else "")
    print(f"fundl: {data.name} ({len(data.train['y'])} train / {len(data.test['y'])} test), "
          f"{who}model {config['model']['kind']} with {num_params:,} params, {total} steps of batch "
          f"{config['training']['batch_size']} from step {start}; run dir {rd.path}", flush=True)


def _check_members_fit_their_data(config: dict, members: list[dict]) -> None:
    """A sweep over the batch size or the data: every member's batch checked against its data
    before the first member trains (the config's own rules were checked when it was validated)."""
    if not any(k == "training.batch_size" or k.startswith("data.") for m in members for k in m):
        return
    sizes: dict[str, Dataset] = {}
    for member in members:
        member_config = sweeps.with_overrides(config, member)
        key = dumps({"data": member_config["data"]})
        if key not in sizes:
            sizes[key] = load_data(member_config)
        try:
            check_batch_fits(member_config, sizes[key])
        except ConfigError as e:
            raise ConfigError(f"--sweep: the member {sweeps.describe_member(member)} is refused: {e}") from None


def run_separately(config: dict, rd: RunDir, keys: list[str], *, config_path: str = "", verbose: bool = True) -> dict:
    """A sweep over settings that change shapes or structure (``keys``): each point as a run of
    its own in ``RUN_DIR/members/<k>/``, one after another; the reports of a one-program sweep."""
    members = sweeps.members(config)
    _check_members_fit_their_data(config, members)
    print(f"fundl: the sweep over {', '.join(keys)} changes shapes or structure, so its {len(members)} points "
          f"run as separate runs in {rd.path / 'members'}/<k>/ (seeds and "
          f"{', '.join('optimizer.' + k for k in injectable(config))} alone would share one compiled program)",
          file=sys.stderr, flush=True)
    rd.write_text("config.toml", dumps(config))
    rows, histories, summaries = [], [], []
    for k, member in enumerate(members):
        member_config = sweeps.with_overrides(config, member)  # no sweep left: a plain run
        member_dir = rd.path / "members" / str(k)
        if verbose and rd.writer:
            print(f"fundl: sweep member {k}: {sweeps.describe_member(member)}", flush=True)
        t0 = time.perf_counter()
        summary = run(member_config, member_dir, config_path=config_path, verbose=verbose)
        wall = time.perf_counter() - t0
        records = read_metrics(member_dir) if rd.writer else []
        last_train = next((r for r in reversed(records) if r["split"] == "train"), {})
        test = {"accuracy": summary["test_accuracy"], "loss": summary["test_loss"]}
        rows.append(member_row(member_config["training"]["seed"], member, test=test, train=last_train, wall=wall))
        histories.append(records)
        summaries.append(summary)
    summary = separate_runs_summary(rows, histories, summaries, rd, config_path=config_path)
    rd.write_summary(summary)
    return summary
