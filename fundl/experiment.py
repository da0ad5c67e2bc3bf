"""From a validated config to a finished run: the glue behind ``scripts/train.py``.

Sections, in order: data, model, optimiser, steps, state (fresh or resumed),
fit, summary.  Each piece is an ordinary fundl function; this module only
wires them as the config says.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fundl import config as cfg
from fundl import models
from fundl.data import Dataset, Loader, load_dataset
from fundl.losses import softmax_cross_entropy
from fundl.metrics import classification_metrics
from fundl.nn import Layer
from fundl.train import checkpoint as ckpt
from fundl.train.loop import evaluate, fit
from fundl.train.optim import optimizer_from_config
from fundl.train.rundir import RunDir, plot_curves
from fundl.train.state import TrainState, count_params, create_train_state
from fundl.train.step import make_eval_step, make_train_step

PUBLISHED = {  # reference test accuracies, for the printout beside ours
    ("mnist1d", "cnn1d"): ("MNIST-1D paper (Greydanus & Kobak 2020), CNN", 0.94),
    ("mnist1d", "mlp"): ("MNIST-1D paper, MLP", 0.68),
    ("mnist1d", "rnn"): ("MNIST-1D paper's recurrent baseline, a GRU", 0.91),
}


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
    if kind == "mlp":
        return models.mlp(m["hidden"], num_outputs, activation=m["activation"], dropout=m["dropout"])
    if kind in ("cnn", "cnn1d"):
        return models.cnn(m["channels"], m["hidden"], num_outputs, kernel_size=m["kernel_size"],
                          stride=m["stride"], padding=m["padding"], pool=m["pool"],
                          batch_norm=m["batch_norm"], activation=m["activation"], dropout=m["dropout"],
                          nd=2 if kind == "cnn" else 1, axis_name=axis_name)
    if kind == "rnn":
        return models.rnn_classifier(m["cell"], m["rnn_hidden"], num_outputs, num_layers=m["num_layers"],
                                     bidirectional=m["bidirectional"], readout=m["readout"],
                                     dropout=m["dropout"])
    if kind == "char_lm":
        return models.char_lm(num_outputs, embed_dim=m["embed_dim"], cell=m["cell"],
                              hidden=m["rnn_hidden"], num_layers=m["num_layers"], dropout=m["dropout"])
    raise cfg.ConfigError(f"model.kind {kind!r} is not one of {cfg.CHOICES[('model', 'kind')]}")


# ------------------------------------------------------------ optimiser
def total_steps_of(config: dict, steps_per_epoch: int) -> int:
    t = config["training"]
    return t["steps"] if t["steps"] > 0 else t["epochs"] * steps_per_epoch


def initial_state(config: dict, data: Dataset, steps_per_epoch: int, *, axis_name: str | None = None):
    """``(model, optimizer, state)`` a run of ``config`` starts from (also the
    template its checkpoints restore into)."""
    model = build_model(config["model"], data.num_classes, axis_name=axis_name)
    optimizer = optimizer_from_config(config, total_steps_of(config, steps_per_epoch))
    state = create_train_state(model, optimizer, jax.random.key(config["training"]["seed"]),
                               (1,) + tuple(data.input_shape))
    return model, optimizer, state


# ------------------------------------------------------------- the run
def make_placement(config: dict):
    """The placement ``[parallel]`` asks for (see ``fundl.train.parallel.make_placement``)."""
    from fundl.train import parallel

    try:
        return parallel.make_placement(config["parallel"]["mode"], config["parallel"]["devices"])
    except ValueError as e:
        raise cfg.ConfigError(str(e)) from None


def run(config: dict, run_dir: str | os.PathLike, *, config_path: str = "", verbose: bool = True) -> dict:
    """Train and evaluate as ``config`` says, writing the run directory; return the summary."""
    t = config["training"]
    placement = make_placement(config)
    writer = jax.process_index() == 0
    rd = RunDir(run_dir, writer=writer, tensorboard=config["logging"]["tensorboard"])
    structure = cfg.structure_hash(config)

    # data
    data = load_data(config)
    check_labels(data)
    try:
        placement.check_batch_size(t["batch_size"])
    except ValueError as e:
        raise cfg.ConfigError(f"training.batch_size: {e}") from None
    loader = Loader(data.train, t["batch_size"], seed=t["seed"], drop_last=True, prefetch=config["data"]["prefetch"],
                    process_index=jax.process_index(), process_count=jax.process_count())
    total = total_steps_of(config, loader.steps_per_epoch)

    # model and optimiser
    model, optimizer, state = initial_state(config, data, loader.steps_per_epoch, axis_name=placement.axis_name)
    num_params = count_params(state.params)

    # resume
    if t["resume"]:
        check_resumable(rd, config)
        state = _resume(rd, state, structure, verbose and writer)
        if int(state.step) > total:
            raise cfg.ConfigError(
                f"cannot resume {rd.path}: its checkpoint is at step {int(state.step)}, past the {total} steps "
                f"this config asks for; raise training.steps or training.epochs")
    rd.write_text("config.toml", cfg.dumps(config))
    rd.truncate_metrics(int(state.step))

    # steps
    dtype = t["compute_dtype"]
    loss_scale = t["loss_scale"] or None
    train_step = make_train_step(model, optimizer, softmax_cross_entropy, classification_metrics(),
                                 compute_dtype=dtype, loss_scale=loss_scale,
                                 axis_name=placement.axis_name)
    eval_step = placement.compile_eval(make_eval_step(model, softmax_cross_entropy, classification_metrics(),
                                                      compute_dtype=dtype,
                                                      axis_name=placement.axis_name))
    eval_batch = min(t["eval_batch_size"], len(data.test["y"]))
    eval_batch -= eval_batch % placement.num_devices

    def eval_fn(s: TrainState):
        return evaluate(eval_step, *placement.put_eval_params(s), data.test, eval_batch,
                        placement=placement.for_eval())

    if verbose and writer:
        print(f"fundl: {data.name} ({len(data.train['y'])} train / {len(data.test['y'])} test), "
              f"model {config['model']['kind']} with {num_params:,} params, {total} steps of batch "
              f"{t['batch_size']} from step {int(state.step)}; run dir {rd.path}", flush=True)
    try:
        result = fit(state, train_step, loader, num_steps=total, eval_fn=eval_fn, eval_every=t["eval_every"],
                     log_every=t["log_every"], run_dir=rd, checkpoint_every=t["checkpoint_every"],
                     keep_checkpoints=t["keep_checkpoints"], checkpoint_extras={"config_hash": structure},
                     steps_per_call=t["steps_per_call"], unroll=t["unroll"], nan_policy=t["nan_policy"],
                     progress=t["progress"], placement=placement,
                     resume_hint=f"resume with: python scripts/train.py --resume {rd.path}")
    except BaseException:  # signal, NaN, disk full: flush what was logged (tensorboard) before leaving
        rd.close()
        raise
    final = result.final_eval
    summary = {
        "final_step": total,
        "epochs": total / loader.steps_per_epoch,
        "test_accuracy": final.get("accuracy"),
        "test_loss": final.get("loss"),
        "train_seconds": result.train_seconds,
        "examples_per_second": result.examples_per_second,
        "num_params": num_params,
        "config_path": str(config_path),
        "dataset": data.name,
        "model": config["model"]["kind"],
        "compute_dtype": dtype,
        "devices": placement.num_devices,
        "processes": jax.process_count(),
    }
    if result.skipped_updates is not None:
        summary["skipped_updates"] = result.skipped_updates  # nan_policy="skip"
    rd.write_summary(summary)
    if writer and config["logging"]["plots"]:
        plot_curves(rd.path)
    rd.close()
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


def structure_diff(old: dict, new: dict) -> list[str]:
    """``section.key: old -> new`` for the settings that fix the train state's structure
    (``fundl.config.STRUCTURE_KEYS``, those ``structure_hash`` covers)."""
    lines = []
    old, new = cfg.structure_settings(old), cfg.structure_settings(new)
    for section in cfg.STRUCTURE_KEYS:
        a, b = old[section], new[section]
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                lines.append(f"{section}.{key}: {a.get(key, '<unset>')!r} in the run, {b.get(key, '<unset>')!r} now")
    return lines


def check_resumable(rd: RunDir, config: dict) -> None:
    """Refuse to resume ``rd`` when its saved config.toml differs in model/optimiser/data
    structure from ``config``; the message lists the keys that differ.  Changing only
    training settings (epochs, steps, eval or checkpoint intervals) is allowed."""
    saved = rd.path / "config.toml"
    if not saved.is_file() or not ckpt.list_checkpoints(rd.checkpoint_dir):
        return
    try:
        old = cfg.load_config(saved)
    except cfg.ConfigError:
        return  # an unreadable old config: the checkpoint's structure hash still guards the resume
    if cfg.structure_hash(old) == cfg.structure_hash(config):
        return
    diff = structure_diff(old, config)
    raise cfg.ConfigError(
        f"cannot resume {rd.path}: the config changes the model/optimiser/data structure of the run "
        f"(saved in {saved}):\n  " + "\n  ".join(diff) +
        "\nOnly training settings (e.g. training.epochs or training.steps) may change on resume; "
        "undo these changes or start a new run directory")


def _resume(rd: RunDir, state: TrainState, structure: str, verbose: bool) -> TrainState:
    path = ckpt.latest_valid(rd.checkpoint_dir)
    if path is None:
        if verbose:
            print(f"fundl: no checkpoint in {rd.checkpoint_dir}; starting from step 0", flush=True)
        return state
    manifest = ckpt.read_manifest(path, verify=False)
    saved = manifest.get("extras", {}).get("config_hash")
    if saved is not None and saved != structure:
        old = rd.path / "config.toml"
        raise cfg.ConfigError(
            f"cannot resume {rd.path}: its checkpoint was made with a different model/optimiser/data "
            f"structure (hash {saved} vs {structure}); compare with {old} or start a new run directory")
    restored, _ = ckpt.restore(path, state)
    if verbose:
        print(f"fundl: resuming from {path} (step {manifest['step']})", flush=True)
    return restored


def read_summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())
