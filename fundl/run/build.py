"""The pieces of a run, built from a validated config: data, model, optimiser, train state,
placement and train step.

Each is an ordinary library call (``fundl.data``, ``fundl.models``,
``fundl.train.*``) with the config's values; ``fundl.run.experiment`` wires
them, ``fundl.run.evaluator`` rebuilds a finished run's model from them.
Errors the library raises about a setting become ConfigErrors naming its key.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from fundl import models
from fundl.data import DataError, Dataset, load_dataset
from fundl.losses import softmax_cross_entropy
from fundl.metrics import classification_metrics
from fundl.nn import Layer
from fundl.run import lora, sweeps
from fundl.run.config import CHOICES, ConfigError
from fundl.run.optimizer import optimizer_from_config
from fundl.train.placement import make_placement, state_bytes
from fundl.train.ensemble import stack_states
from fundl.train.optim import set_hyperparams
from fundl.train.state import TrainState, create_train_state
from fundl.train.step import make_train_step


# ----------------------------------------------------------------- data
def load_data(config: dict) -> Dataset:
    """The dataset ``[data]`` names, flattened if ``data.flatten``."""
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


def check_labels(data: Dataset) -> None:
    """Labels must be integer class ids in [0, num_classes), checked on the host before training
    (inside a jitted step an out-of-range label silently gives a wrong loss)."""
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


def total_steps_of(config: dict, steps_per_epoch: int) -> int:
    """The run's length in optimiser steps: ``training.steps``, else ``training.epochs`` epochs."""
    t = config["training"]
    return t["steps"] if t["steps"] > 0 else t["epochs"] * steps_per_epoch


# ---------------------------------------------------------------- model
def build_model(model_cfg: dict, num_outputs: int, *, axis_name: str | None = None,
                context: int | None = None) -> Layer:
    """The model a config's ``[model]`` section describes (checked by ``fundl.run.config.check_config``).

    ``context``: a GPT's most positions (``data.seq_len``).

    ``axis_name``: the ``pmap`` axis over which batch-norm statistics are
    averaged (``placement.axis_name``; None on one device or with sharding).
    """
    m = model_cfg
    kind = m["kind"]
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
    if kind == "gpt":
        return models.gpt(num_outputs, context=context, layers=m["layers"], heads=m["heads"], width=m["width"],
                          dropout=m["dropout"], bias=m["bias"], remat=m["remat"])
    raise ConfigError(f"model.kind {kind!r} is not one of {CHOICES[('model', 'kind')]}")


# ------------------------------------------------- optimiser and state
def initial_state(config: dict, data: Dataset, steps_per_epoch: int, *, axis_name: str | None = None):
    """``(model, optimizer, state)`` a run of ``config`` starts from (also the
    template its checkpoints restore into).  An ensemble or one-program sweep
    (``fundl.run.sweeps``) gets a state with a leading member axis: member ``i``'s
    slice is what a run of its own config would start from."""
    model = build_model(config["model"], data.num_classes, axis_name=axis_name, context=config["data"]["seq_len"])
    base = None
    if lora.enabled(config):  # params: the adapters; the base run's params frozen in the model state
        base = lora.base_params(config, model, (1,) + tuple(data.input_shape))
        model = lora.adapted_model(config, model)
    inject = sweeps.injected(config)
    optimizer = optimizer_from_config(config, total_steps_of(config, steps_per_epoch), inject=inject)
    t = config["training"]

    def state_for(member: dict) -> TrainState:
        seed = member.get("training.seed", t["seed"])
        state = create_train_state(model, optimizer, jax.random.key(seed), (1,) + tuple(data.input_shape),
                                   compute_dtype=t["compute_dtype"], loss_scale=t["loss_scale"] or None)
        values = {k: member.get(f"optimizer.{k}", config["optimizer"][k]) for k in inject}
        state = state if base is None else lora.with_base(state, base)
        return state.replace(opt_state=set_hyperparams(state.opt_state, **values)) if values else state

    members = sweeps.members(config)
    state = state_for(members[0]) if len(members) == 1 else stack_states([state_for(m) for m in members])
    return model, optimizer, state


def train_step_for(config: dict, model: Layer, optimizer, *, dp=None, axis_name: str | None = None,
                   members: int = 1):
    """The pure train step of a run: DP-SGD's (``dp``: ``fundl.run.privacy.dp_setup``) or the
    plain one, vmapped over the members of an ensemble or one-program sweep."""
    t = config["training"]
    if dp is not None:  # per-example clipping and noise (fundl.transforms.dp)
        step = dp.make_train_step(model, optimizer, softmax_cross_entropy, classification_metrics(),
                                  compute_dtype=t["compute_dtype"], axis_name=axis_name)
    else:
        step = make_train_step(model, optimizer, softmax_cross_entropy, classification_metrics(),
                               compute_dtype=t["compute_dtype"], loss_scale=t["loss_scale"] or None,
                               axis_name=axis_name)
    return jax.vmap(step) if members > 1 else step  # the members as one program


# ------------------------------------------------------------ placement
def placement_from_config(config: dict):
    """The placement ``[parallel]`` asks for (see ``fundl.train.placement.make_placement``); a setting
    the placement refuses (for this machine's devices, say) is a ConfigError."""
    p, n = config["parallel"], len(sweeps.members(config))
    one_program, _ = sweeps.in_one_program(config)
    try:
        return make_placement(p["mode"], p["devices"], members=n if n > 1 and one_program else 0,
                              member_devices=p["member_devices"], model_devices=p["model_devices"],
                              rules=p["rules"], min_size=p["fsdp_min_size"])
    except ValueError as e:
        raise ConfigError(str(e)) from None


def single_device():
    """The placement of one device, whatever a config's ``[parallel]`` says (for re-evaluation)."""
    return make_placement("none")


def sharded_layout(placement, state) -> dict:
    """For a placement that splits the state (fsdp): the bytes of the train state on one device
    and in all (``{}`` otherwise).  A partition rule that does not fit a leaf is a ConfigError."""
    if not placement.splits_state:
        return {}
    try:
        shardings = placement.shardings(state)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    per_device, total = state_bytes(state, shardings)
    return {"state_bytes_per_device": per_device, "state_bytes": total}
