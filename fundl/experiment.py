"""From a validated config to a finished run: the glue behind ``scripts/train.py``.

Sections, in order: data, model, optimiser, steps, state (fresh or resumed),
fit, summary.  Each piece is an ordinary fundl function; this module only
wires them as the config says.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from fundl import config as cfg
from fundl import distributed, models, sweeps
from fundl.data import Dataset, Loader, load_dataset
from fundl.losses import softmax_cross_entropy
from fundl.metrics import classification_metrics
from fundl.nn import Layer
from fundl.train import checkpoint as ckpt
from fundl.train.loop import evaluate, fit
from fundl.train.ensemble import MemberLoaders, make_ensemble_eval_step, split_members, stack_states
from fundl.train.optim import injectable, optimizer_from_config, set_hyperparams
from fundl.train.resume import (
    DATA_ORDER_KEYS, check_allowed_names, check_changes, config_changes, describe_effects, loader_mismatch,
)
from fundl.train.rundir import RunDir, RunDirError, plot_curves
from fundl.train.state import TrainState, count_params, create_train_state
from fundl.train.step import make_eval_step, make_train_step

PUBLISHED = {  # reference test accuracies, for the printout beside ours (docs/reproduction.md)
    ("mnist1d", "cnn1d"): ("MNIST-1D paper (Greydanus & Kobak 2020), CNN", 0.94),
    ("mnist1d", "logistic"): ("MNIST-1D paper, logistic regression", 0.32),
    ("mnist1d", "mlp"): ("MNIST-1D paper, MLP", 0.68),
    ("mnist1d", "rnn"): ("MNIST-1D paper's recurrent baseline, a GRU", 0.91),
}


def published_reference(config: dict) -> tuple[str, float] | None:
    """The published accuracy of the model family ``config`` trains, if any: an MLP
    with no hidden layer is logistic regression, not the paper's MLP."""
    kind = config["model"]["kind"]
    if kind == "mlp" and not config["model"]["hidden"]:
        kind = "logistic"
    return PUBLISHED.get((config["data"]["name"], kind))


# ----------------------------------------------------------------- data
def load_data(config: dict) -> Dataset:
    d = config["data"]
    opts = {}
    if d["name"] == "synthetic":
        if d["num_train"]:
            opts["num_train"] = d["num_train"]
        if d["num_test"]:
            opts["num_test"] = d["num_test"]
    if d["name"] in ("shakespeare", "text"):
        opts["seq_len"] = d["seq_len"]
    ds = load_dataset(d["name"], data_dir=d["dir"] or None, **opts)
    if d["flatten"]:
        flat = lambda split: {**split, "x": split["x"].reshape(len(split["x"]), -1)}
        ds = Dataset(ds.name, flat(ds.train), flat(ds.test), ds.num_classes,
                     (math.prod(ds.input_shape),), ds.meta)
    return ds


# ---------------------------------------------------------------- model
def build_model(model_cfg: dict, num_outputs: int, *, axis_name: str | None = None) -> Layer:
    """The model a config's ``[model]`` section describes.

    ``axis_name``: the ``pmap`` axis over which batch-norm statistics are
    averaged (``placement.axis_name``; None on one device or with sharding).
    """
    m = model_cfg
    kind = m["kind"]
    if m["input_dropout"] and kind != "mlp":
        raise cfg.ConfigError(f"model.input_dropout applies to model.kind='mlp' only, got kind={kind!r}; "
                              f"use model.dropout (on hidden features) instead")
    if m["remat"] and kind not in ("mlp", "rnn", "char_lm"):
        raise cfg.ConfigError(f"model.remat applies to model.kind 'mlp', 'rnn' and 'char_lm', got {kind!r}")
    _check_model_shapes(m)
    if kind == "mlp":
        return models.mlp(m["hidden"], num_outputs, activation=m["activation"], dropout=m["dropout"],
                          input_dropout=m["input_dropout"], remat=m["remat"], residual=m["residual"],
                          init=m["init"])
    if kind in ("cnn", "cnn1d"):
        return models.cnn(m["channels"], m["hidden"], num_outputs, kernel_size=m["kernel_size"],
                          stride=m["stride"], padding=m["padding"], pool=m["pool"],
                          batch_norm=m["batch_norm"], activation=m["activation"], dropout=m["dropout"],
                          nd=2 if kind == "cnn" else 1, axis_name=axis_name, init=m["init"])
    if kind == "rnn":
        return models.rnn_classifier(m["cell"], m["rnn_hidden"], num_outputs, num_layers=m["num_layers"],
                                     bidirectional=m["bidirectional"], readout=m["readout"],
                                     dropout=m["dropout"], remat=m["remat"], init=m["init"])
    if kind == "char_lm":
        return models.char_lm(num_outputs, embed_dim=m["embed_dim"], cell=m["cell"],
                              hidden=m["rnn_hidden"], num_layers=m["num_layers"], dropout=m["dropout"],
                              remat=m["remat"], init=m["init"])
    raise cfg.ConfigError(f"model.kind {kind!r} is not one of {cfg.CHOICES[('model', 'kind')]}")


def _check_model_shapes(m: dict) -> None:
    """Settings that must agree with the model kind or with each other, as ConfigErrors naming the key."""
    kind = m["kind"]
    if m["residual"] and kind != "mlp":
        raise cfg.ConfigError(f"model.residual applies to model.kind='mlp' only, got kind={kind!r}; "
                              f"set model.residual = 0")
    if m["residual"] and not m["hidden"]:
        raise cfg.ConfigError(f"model.residual = {m['residual']} blocks need a hidden layer of the width they keep, "
                              f"got model.hidden = []; give e.g. model.hidden = [100]")
    sizes = m["kernel_size"]
    if isinstance(sizes, list) and kind in ("cnn", "cnn1d") and len(sizes) != len(m["channels"]):
        raise cfg.ConfigError(f"model.kernel_size must be an int or one size per conv layer: expected "
                              f"{len(m['channels'])} sizes (model.channels = {m['channels']}), got {len(sizes)}: "
                              f"{sizes}")


# ------------------------------------------------------------ optimiser
def total_steps_of(config: dict, steps_per_epoch: int) -> int:
    t = config["training"]
    return t["steps"] if t["steps"] > 0 else t["epochs"] * steps_per_epoch


def initial_state(config: dict, data: Dataset, steps_per_epoch: int, *, axis_name: str | None = None):
    """``(model, optimizer, state)`` a run of ``config`` starts from (also the
    template its checkpoints restore into).  An ensemble or one-program sweep
    (``fundl.sweeps``) gets a state with a leading member axis: member ``i``'s
    slice is what a run of its own config would start from."""
    model = build_model(config["model"], data.num_classes, axis_name=axis_name)
    inject = sweeps.injected(config)
    optimizer = optimizer_from_config(config, total_steps_of(config, steps_per_epoch), inject=inject)
    t = config["training"]

    def state_for(member: dict) -> TrainState:
        seed = member.get("training.seed", t["seed"])
        state = create_train_state(model, optimizer, jax.random.key(seed), (1,) + tuple(data.input_shape),
                                   compute_dtype=t["compute_dtype"], loss_scale=t["loss_scale"] or None)
        values = {k: member.get(f"optimizer.{k}", config["optimizer"][k]) for k in inject}
        return state.replace(opt_state=set_hyperparams(state.opt_state, **values)) if values else state

    members = sweeps.members(config)
    state = state_for(members[0]) if len(members) == 1 else stack_states([state_for(m) for m in members])
    return model, optimizer, state


# ------------------------------------------------------------- the run
def placement_from_config(config: dict):
    """The placement ``[parallel]`` asks for (see ``fundl.train.placement.make_placement``)."""
    from fundl.train.placement import make_placement

    p, n = config["parallel"], len(sweeps.members(config))
    one_program, _ = sweeps.in_one_program(config)
    try:
        return make_placement(p["mode"], p["devices"], members=n if n > 1 and one_program else 0,
                              member_devices=p["member_devices"], model_devices=p["model_devices"],
                              rules=p["rules"], min_size=p["fsdp_min_size"])
    except ValueError as e:
        raise cfg.ConfigError(str(e)) from None


def sharded_layout(placement, state) -> dict:
    """For a placement that splits the state (fsdp): the bytes of the train state on one device
    and in all (``{}`` otherwise).  A partition rule that does not fit a leaf is a ConfigError."""
    from fundl.train.placement import state_bytes

    if not placement.splits_state:
        return {}
    try:
        shardings = placement.shardings(state)
    except ValueError as e:
        raise cfg.ConfigError(str(e)) from None
    per_device, total = state_bytes(state, shardings)
    return {"state_bytes_per_device": per_device, "state_bytes": total}


def open_run_dir(run_dir, config: dict, *, overwrite: bool = False) -> RunDir:
    """Claim ``run_dir`` for this run (process 0 claims, every process gets the verdict).

    A fresh run refuses a directory that holds an earlier run, unless
    ``overwrite`` (the old run is moved aside); ``training.resume`` continues it.
    """
    if config["logging"]["tensorboard"]:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise cfg.ConfigError("logging.tensorboard = true needs tensorboardX, which is not installed: "
                                  "pip install tensorboardX (or fundl[dev]), or set logging.tensorboard=false") from None
    if overwrite and config["training"]["resume"]:
        raise cfg.ConfigError("--overwrite starts afresh and --resume continues the run: choose one")
    existing = "resume" if config["training"]["resume"] else "overwrite" if overwrite else "refuse"
    writer = jax.process_index() == 0
    rd, error = None, None
    if writer:
        try:
            rd = RunDir(run_dir, writer=True, tensorboard=config["logging"]["tensorboard"], existing=existing)
        except RunDirError as e:
            error = e
    message = distributed.process_zero_error(None if error is None else str(error))
    if message is not None:
        raise error if error is not None else RunDirError(f"process 0 refused the run directory: {message}")
    return rd if writer else RunDir(run_dir, writer=False)


def run(config: dict, run_dir: str | os.PathLike, *, config_path: str = "", verbose: bool = True,
        overwrite: bool = False, allow_changes: Sequence[str] = ()) -> dict:
    """Train and evaluate as ``config`` says, writing the run directory; return the summary.

    ``overwrite``: a fresh run into a directory holding an earlier run moves
    that run aside (else it is refused).  ``allow_changes``: settings (or
    sections) a resumed run may change although they alter its trajectory
    (``fundl.train.resume``).
    """
    check_allowed_names(allow_changes)
    one_program, separate = sweeps.in_one_program(config)
    placement = placement_from_config(config)
    rd = open_run_dir(run_dir, config, overwrite=overwrite)
    with rd:
        if not one_program:
            return _run_separately(config, rd, separate, config_path, verbose)
        return _run(config, rd, placement, config_path, verbose, allow_changes)


def _run(config, rd, placement, config_path, verbose, allow_changes) -> dict:
    t = config["training"]
    say = verbose and rd.writer
    if rd.moved_to is not None:  # said even when quiet: files moved
        print(f"fundl: moved the earlier run in {rd.path} aside to {rd.moved_to}", file=sys.stderr, flush=True)

    # data
    data = load_data(config)
    check_labels(data)
    try:
        placement.check_batch_size(t["batch_size"])
    except ValueError as e:
        raise cfg.ConfigError(f"training.batch_size: {e}") from None
    members = sweeps.members(config)  # [{}] for a plain run
    ensemble = len(members) > 1
    loaders = [Loader(data.train, t["batch_size"], seed=m.get("training.seed", t["seed"]), drop_last=True,
                      shuffle=config["data"]["shuffle"], prefetch=config["data"]["prefetch"],
                      process_index=jax.process_index(),
                      process_count=jax.process_count()) for m in members]
    dp = dp_setup(config, data, placement)  # None unless [privacy] enabled (docs/privacy.md)
    loader = dp.loader if dp is not None else MemberLoaders(loaders) if ensemble else loaders[0]
    total = total_steps_of(config, loader.steps_per_epoch)

    # model and optimiser
    model, optimizer, state = initial_state(config, data, loader.steps_per_epoch, axis_name=placement.axis_name)
    num_params = count_params(state.params) // len(members)  # of one member
    layout = sharded_layout(placement, state)  # fsdp: each leaf's split, checked before training

    # resume
    run_id = uuid.uuid4().hex[:12]
    if t["resume"]:
        state, run_id = resume(rd, state, config, loader, allow_changes, verbose=say, new_run_id=run_id,
                               placement=placement)
        if _step_of(state) > total:
            raise cfg.ConfigError(
                f"cannot resume {rd.path}: its checkpoint is at step {_step_of(state)}, past the {total} steps "
                f"this config asks for; raise training.steps or training.epochs")
    rd.write_text("config.toml", cfg.dumps(config))  # what is actually being run
    rd.truncate_metrics(_step_of(state))

    # steps
    dtype = t["compute_dtype"]
    loss_scale = t["loss_scale"] or None
    if dp is not None:  # per-example clipping and noise (fundl.transforms.dp)
        train_step = dp.make_train_step(model, optimizer, softmax_cross_entropy, classification_metrics(),
                                        compute_dtype=dtype, axis_name=placement.axis_name)
    else:
        train_step = make_train_step(model, optimizer, softmax_cross_entropy, classification_metrics(),
                                     compute_dtype=dtype, loss_scale=loss_scale,
                                     axis_name=placement.axis_name)
    if ensemble:
        train_step = jax.vmap(train_step)  # the members as one program
    eval_fn = make_evaluator(config, model, data, placement, len(members), warm_state=state)
    if dp is not None:
        eval_fn = dp.with_epsilon(eval_fn)  # eval records in metrics.jsonl carry epsilon and delta

    if say and layout:
        print(f"fundl: fsdp: train state {layout['state_bytes_per_device'] / 2**20:.2f} MiB per device of "
              f"{layout['state_bytes'] / 2**20:.2f} MiB ({layout['state_bytes_per_device'] / layout['state_bytes']:.2f}x)"
              + ("; nothing is split: no float leaf has parallel.fsdp_min_size elements and a dimension divisible "
                 f"by the {placement.data_devices} data devices" if layout['state_bytes_per_device'] ==
                 layout['state_bytes'] and placement.data_devices > 1 else ""), flush=True)
    if say:
        who = f"{len(members)} members ({', '.join(map(_describe_member, members))}) of " if ensemble else ""
        print(f"fundl: {data.name} ({len(data.train['y'])} train / {len(data.test['y'])} test), "
              f"{who}model {config['model']['kind']} with {num_params:,} params, {total} steps of batch "
              f"{t['batch_size']} from step {_step_of(state)}; run dir {rd.path}", flush=True)
    result = fit(state, train_step, loader, num_steps=total, eval_fn=eval_fn, eval_every=t["eval_every"],
                 log_every=t["log_every"], run_dir=rd, checkpoint_every=t["checkpoint_every"],
                 keep_checkpoints=t["keep_checkpoints"], checkpoint_extras={"config": config, "run_id": run_id},
                 steps_per_call=t["steps_per_call"], unroll=t["unroll"], nan_policy=t["nan_policy"],
                 progress=t["progress"], placement=placement,
                 resume_hint=f"resume with: python scripts/train.py --resume {rd.path}",
                 async_checkpoints=t["async_checkpoints"])
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
        "compute_dtype": dtype,
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
    if ensemble or t["sweep"]:
        summary.update(_members_summary(config, members, result.history, result.train_seconds, rd))
    rd.write_summary(summary)
    if rd.writer and config["logging"]["plots"]:
        plot_curves(rd.path)
    return summary


def _step_of(state) -> int:
    """The step of a state (an ensemble's members all share it)."""
    return int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])


def _describe_member(member: dict) -> str:
    return ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in member.items()) or "the config's"


def make_evaluator(config: dict, model, data: Dataset, placement, num_members: int = 1, warm_state=None):
    """``eval_fn(state) -> dict``: exact test-split means for a state as ``fit`` holds it.  For an
    ensemble: the ensemble's prediction (mean of the members' probabilities) and ``members``, a
    list of each member's.

    With ``warm_state`` (the train state about to be trained), the eval step is compiled here by
    evaluating that state on one batch of the test split: a broken evaluation fails before
    training starts, and the first evaluation does not stop training to compile (it did, for
    0.1-0.2 s, in the middle of the run)."""
    t = config["training"]
    eval_batch = min(t["eval_batch_size"], len(data.test["y"]))
    eval_batch -= eval_batch % placement.num_devices
    if num_members > 1:
        step = placement.compile_eval(make_ensemble_eval_step(model, softmax_cross_entropy, classification_metrics(),
                                                              compute_dtype=t["compute_dtype"]))
    else:
        step = placement.compile_eval(make_eval_step(model, softmax_cross_entropy, classification_metrics(),
                                                     compute_dtype=t["compute_dtype"], axis_name=placement.axis_name))

    def eval_fn(s: TrainState):  # the state fit holds on the devices: evaluated there, no host copy
        out = evaluate(step, *placement.eval_params(s), data.test, eval_batch, placement=placement.for_eval())
        return split_members(out, num_members) if num_members > 1 else out

    if warm_state is not None:
        first = {k: v[:eval_batch] for k, v in data.test.items()}  # one batch: the shape every evaluation uses
        evaluate(step, *placement.eval_params(warm_state), first, eval_batch, placement=placement.for_eval())
    return eval_fn


def _member_rows(config: dict, members: list[dict], history: list[dict], wall: float) -> tuple[list, list]:
    """One summary row per member of a one-program ensemble or sweep, and each member's records."""
    rows, histories = [], []
    last = {split: next((r for r in reversed(history) if r["split"] == split), {}) for split in ("train", "eval")}
    for i, m in enumerate(members):
        train = (last["train"].get("members") or [last["train"]])[i] if last["train"] else {}
        test = (last["eval"].get("members") or [last["eval"]])[i] if last["eval"] else {}
        overrides = {k: v for k, v in m.items() if config["training"]["sweep"] or k != "training.seed"}
        rows.append({"seed": m.get("training.seed", config["training"]["seed"]), "overrides": overrides,
                     "test_accuracy": test.get("accuracy"), "test_loss": test.get("loss"),
                     "train_accuracy": train.get("accuracy"), "train_loss": train.get("loss"),
                     "wall_seconds": wall})
        histories.append([{"step": r["step"], "split": r["split"], **(r.get("members") or [r])[i]}
                          for r in history if r["split"] in ("train", "eval")])
    return rows, histories


def _members_summary(config, members, history, wall, rd) -> dict:
    """The summary entries of an ensemble (its prediction's accuracy) or a sweep (the best member)."""
    rows, histories = _member_rows(config, members, history, wall)
    out = {"members": [{k: r[k] for k in ("seed", "overrides", "test_accuracy", "test_loss", "train_accuracy",
                                          "train_loss")} for r in rows]}
    final = next((r for r in reversed(history) if r["split"] == "eval"), {})
    if config["training"]["sweep"]:
        best = sweeps.write_reports(rd.path, rows, histories) if rd.writer else {"best_member": None}
        out.update(best_member=best["best_member"], test_accuracy=best.get("test_accuracy"),
                   test_loss=best.get("test_loss"))
    else:
        out.update(ensemble_test_accuracy=final.get("accuracy"), ensemble_test_loss=final.get("loss"))
    return out


def _run_separately(config: dict, rd: RunDir, keys: list[str], config_path: str, verbose: bool) -> dict:
    """A sweep over settings that change shapes or structure: each point as its own run in
    ``RUN_DIR/members/<k>/``, one after another; the reports of a one-program sweep."""
    import time

    from fundl.train.rundir import read_metrics

    members = sweeps.members(config)
    print(f"fundl: the sweep over {', '.join(keys)} changes shapes or structure, so its {len(members)} points "
          f"run as separate runs in {rd.path / 'members'}/<k>/ (seeds and "
          f"{', '.join('optimizer.' + k for k in injectable(config))} alone would share one compiled program)",
          file=sys.stderr, flush=True)
    rd.write_text("config.toml", cfg.dumps(config))
    rows, histories, summaries = [], [], []
    for k, member in enumerate(members):
        member_config = sweeps.with_overrides(config, member)
        member_dir = rd.path / "members" / str(k)
        if verbose and rd.writer:
            print(f"fundl: sweep member {k}: {_describe_member(member)}", flush=True)
        t0 = time.perf_counter()
        s = run(member_config, member_dir, config_path=config_path, verbose=verbose)
        summaries.append(s)
        rows.append({"seed": member_config["training"]["seed"], "overrides": member,
                     "test_accuracy": s["test_accuracy"], "test_loss": s["test_loss"],
                     "wall_seconds": time.perf_counter() - t0})
        records = read_metrics(member_dir) if rd.writer else []
        last_train = next((r for r in reversed(records) if r["split"] == "train"), {})
        rows[-1].update(train_loss=last_train.get("loss"), train_accuracy=last_train.get("accuracy"))
        histories.append(records)
    best = sweeps.write_reports(rd.path, rows, histories) if rd.writer else {"best_member": None}
    summary = {"final_step": summaries[-1]["final_step"], "test_accuracy": best.get("test_accuracy"),
               "test_loss": best.get("test_loss"), "best_member": best["best_member"],
               "config_path": str(config_path), "separate_runs": True,
               "train_seconds": sum(s["train_seconds"] for s in summaries),
               "examples_per_second": sum(s["examples_per_second"] * s["train_seconds"] for s in summaries)
               / max(sum(s["train_seconds"] for s in summaries), 1e-9),
               "members": [{k: r[k] for k in ("seed", "overrides", "test_accuracy", "test_loss", "train_accuracy",
                                              "train_loss")} for r in rows]}
    rd.write_summary(summary)
    return summary


def check_labels(data: Dataset) -> None:
    """Labels must be integer class ids in [0, num_classes), checked on the host before training
    (inside a jitted step an out-of-range label silently gives a wrong loss)."""
    from fundl.data.errors import DataError

    for split, arrays in (("train", data.train), ("test", data.test)):
        y = np.asarray(arrays["y"])
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"dataset {data.name!r}, {split} split: labels must be integer class ids, "
                            f"got dtype {y.dtype}")
        bad = (y < 0) | (y >= data.num_classes)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            where = first[0] if len(first) == 1 else first
            raise DataError(
                f"dataset {data.name!r}, {split} split: {int(bad.sum())} labels outside the class range "
                f"[0, {data.num_classes}); the first is {int(y[first])} at index {where}. "
                f"Labels must be integer class ids 0..{data.num_classes - 1}")


def resume(rd: RunDir, state: TrainState, config: dict, loader: Loader, allow_changes: Sequence[str] = (), *,
           verbose: bool = True, new_run_id: str = "", placement=None) -> tuple[TrainState, str]:
    """The state to continue from and the run's id: the newest valid checkpoint of ``rd``, restored
    into ``state`` (the template), after checking what the config changes (``fundl.train.resume``).
    With a ``placement`` the leaves are restored straight onto its devices and shardings
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
        return state, new_run_id
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
    if changes and rd.writer:  # said even when quiet (on stderr): the run differs from the checkpoint's
        old_loader = extras.get("loader") or expected
        old_total = total_steps_of(saved, max(1, old_loader["num_examples"] // old_loader["batch_size"]))
        new_total = total_steps_of(config, loader.steps_per_epoch)
        lines = [f"resume changes {c} ({c.kind})" for c in changes]
        lines += describe_effects([c for c in changes if c.kind == "trajectory"], saved, config,
                                  step=step, old_total=old_total, new_total=new_total)
        print("\n".join(f"fundl: {line}" for line in lines), file=sys.stderr, flush=True)
        rd.log({"step": step, "split": "resume", "changes": {c.name: [c.old, c.new] for c in changes}})
    return restored, extras.get("run_id") or new_run_id


def report_error(e: BaseException) -> int | None:
    """For the scripts: print a known error as one message to stderr and return its exit code
    (2: a config or run-directory error, 1: another error whose message says it all); None for
    anything else, or when FUNDL_TRACEBACK is set (the caller re-raises: a traceback)."""
    if os.environ.get("FUNDL_TRACEBACK"):
        return None
    if isinstance(e, (cfg.ConfigError, RunDirError)):
        print(f"{'config error' if isinstance(e, cfg.ConfigError) else 'error'}: {e}", file=sys.stderr)
        return 2
    if isinstance(e, user_errors()):
        print(f"error: {type(e).__name__}: {e}\n(set FUNDL_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 1
    return None


def user_errors() -> tuple:
    """Errors whose message says all a user needs: the scripts print them without a traceback."""
    from fundl.data.errors import DataError, DataNotFoundError, DownloadError
    from fundl.nn.core import LayerError
    from fundl.train.checkpoint import CheckpointWriteError
    from fundl.train.loop import NonFiniteLossError

    return (LayerError, DataError, DataNotFoundError, DownloadError, ckpt.CheckpointError, CheckpointWriteError,
            NonFiniteLossError, PermissionError)


def read_summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


# --------------------------------------------------------------- privacy
def dp_setup(config: dict, data: Dataset, placement=None):
    """The DP-SGD pieces a run of ``config`` needs (``fundl.transforms.DPTraining``: its Poisson
    loader, padded to a multiple of ``placement.num_devices``, its step and ε), or None when
    ``[privacy]`` is off.  Settings DP-SGD cannot honour are
    config errors here, before anything runs (docs/privacy.md)."""
    p, t = config["privacy"], config["training"]
    if not p["enabled"]:
        return None
    from fundl.data.poisson import PoissonLoader
    from fundl.transforms.dp import DPTraining

    if t["ensemble"] > 1 or t["sweep"]:
        raise cfg.ConfigError("privacy.enabled with training.ensemble > 1 or training.sweep: every member would "
                              "train on the same data and their privacy costs add up, which one epsilon per "
                              "run does not report; train one model per DP run")
    if not config["data"]["shuffle"]:
        raise cfg.ConfigError("privacy.enabled with data.shuffle = false: DP-SGD draws every batch by Poisson "
                              "sampling (its privacy accounting needs it), so there is no fixed order to keep; "
                              "set data.shuffle = true")
    if config["model"]["batch_norm"]:
        raise cfg.ConfigError("privacy.enabled with model.batch_norm = true: batch norm normalises each example "
                              "with statistics of its whole batch, so per-example gradients (and their clipping) "
                              "are not defined; set model.batch_norm = false (nn.layer_norm / nn.group_norm "
                              "normalise per example)")
    if config["parallel"]["mode"] in ("sharding", "fsdp") and placement is not None and placement.num_devices > 1:
        # jax 0.10.2, XLA:CPU, 4 devices: vmap(grad) of a convolution over a batch sharded on 'data' returns
        # wrong per-example kernel gradients (off by O(100) against a loop; unsharded and pmap are exact)
        raise cfg.ConfigError(f"privacy.enabled with parallel.mode = '{config['parallel']['mode']}' on several devices: XLA's SPMD "
                              "partitioner computes wrong per-example gradients of convolutions here (measured "
                              "with jax 0.10.2; docs/privacy.md); use parallel.mode = 'pmap', which equals one "
                              "device")
    if t["compute_dtype"] == "float16":
        raise cfg.ConfigError("privacy.enabled with training.compute_dtype = 'float16': DP-SGD does not support "
                              "float16 loss scaling; use 'float32' or 'bfloat16'")
    n = len(data.train["y"])
    if t["batch_size"] > n:
        raise cfg.ConfigError(f"privacy.enabled: training.batch_size = {t['batch_size']} is the expected Poisson "
                              f"batch size and must be <= the {n} training examples")
    loader = PoissonLoader(data.train, t["batch_size"], seed=t["seed"], prefetch=config["data"]["prefetch"],
                           multiple_of=placement.num_devices if placement is not None else 1,
                           process_index=jax.process_index(), process_count=jax.process_count())
    return DPTraining(loader, clip_norm=p["clip_norm"], noise_multiplier=p["noise_multiplier"], delta=p["delta"],
                      accountant=p["accountant"])
