"""The config's keys: each one's default, allowed values and bounds, and how a resume may change it.

Pure data (and one lookup), read by the validator (``fundl.run.config``), the
resume policy (``fundl.run.resume``) and the generated reference in
docs/configs.md, whose "meaning" column is the comment beside each key here.
"""

from __future__ import annotations

from typing import Any

# section -> key -> default value.  A default's type is the key's type
# (ints are accepted where floats are expected; a list default takes lists).
SCHEMA: dict[str, dict[str, Any]] = {
    "model": {
        "kind": "mlp",            # mlp | cnn (2D) | cnn1d | rnn | char_lm | gpt
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
        "remat": False,           # mlp / rnn / char_lm / gpt (per block): recompute activations in the backward pass (less memory)
        "activation": "relu",
        "cell": "lstm",           # rnn / char_lm: lstm | gru
        "rnn_hidden": 128,
        "num_layers": 1,
        "bidirectional": False,
        "readout": "last",        # rnn: last | mean (over all outputs) | flatten (all outputs, flattened)
        "embed_dim": 64,          # char_lm
        "init": "default",        # default (fundl's) | torch (PyTorch's defaults; fundl/models.py)
        "layers": 4,              # gpt: transformer blocks (its context is data.seq_len)
        "heads": 4,               # gpt: attention heads (dividing width)
        "width": 128,             # gpt: embedding width
        "bias": True,             # gpt: biases in the dense layers and LayerNorms (nanoGPT's bias)
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
        "name": "adam",           # one of fundl.run.schema.OPTIMIZERS (docs/optimizers.md)
        "learning_rate": 1e-3,
        "momentum": 0.0,          # sgd / rmsprop (an error elsewhere: see docs/optimizers.md)
        "nesterov": False,        # sgd / rmsprop (with momentum) and the adam family
        "b1": "auto",             # adam family and lion: the first moment's decay ("auto": optax's default)
        "b2": "auto",             # adam family and lion: the second moment's decay ("auto": optax's default)
        "weight_decay": 0.0,      # decoupled, scaled by the learning rate, for every optimiser
        "decay_matrices_only": False,  # weight decay on parameters with >= 2 dimensions only (nanoGPT's rule)
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
        "sweep": [],              # ["section.key=v1,v2,..."]: one member per point (fundl/run/sweeps.py)
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
    "lora": {                     # fine-tune a trained run through low-rank adapters (docs/transforms.md, "LoRA")
        "init_from": "",          # the run directory whose newest valid checkpoint's params are frozen ("": off)
        "rank": 8,                # the adapters' rank r
        "alpha": 16.0,            # the adapters' scale is alpha / rank
        "targets": ".*",          # regex searched in each parameter's path (e.g. blocks_0/attn/qkv/w); >= 2-D only
    },
}

CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("model", "kind"): ("mlp", "cnn", "cnn1d", "rnn", "char_lm", "gpt"),
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
# Keys that take "auto" or a float in [0, 1) (their default is "auto").
AUTO_OR_FRACTION = {("optimizer", "b1"), ("optimizer", "b2")}
# Keys that take a positive int or a non-empty list of them (their default is an int).
INT_OR_INT_LIST = {("model", "kernel_size")}
# Keys that take one of their CHOICES or an int >= 0 (their default is a string).
CHOICE_OR_INT = {("model", "padding")}

POSITIVE = {("training", "batch_size"), ("training", "eval_batch_size"), ("training", "log_every"),
            ("training", "steps_per_call"), ("training", "keep_checkpoints"),
            ("optimizer", "accumulate_steps"), ("model", "stride"),
            ("training", "ensemble"), ("parallel", "member_devices"), ("parallel", "model_devices"),
            ("model", "rnn_hidden"), ("model", "num_layers"), ("model", "embed_dim"), ("data", "seq_len"),
            ("model", "layers"), ("model", "heads"), ("model", "width"),
            ("privacy", "clip_norm"), ("privacy", "delta"), ("lora", "rank"), ("lora", "alpha")}
NON_NEGATIVE = {("training", "epochs"), ("training", "steps"), ("training", "eval_every"), ("model", "residual"),
                ("training", "checkpoint_every"), ("training", "unroll"), ("training", "loss_scale"),
                ("optimizer", "weight_decay"), ("optimizer", "clip_norm"), ("optimizer", "momentum"),
                ("data", "num_train"), ("data", "num_test"), ("data", "prefetch"), ("parallel", "devices"),
                ("parallel", "fsdp_min_size"),
                ("schedule", "warmup_steps"), ("schedule", "transition_steps"), ("privacy", "noise_multiplier")}

# The optimisers a config may name: each is tested against a direct optax call
# with every [optimizer] setting (tests/test_optim.py).  The library's
# make_optimizer takes any optax optimiser; this list is what a config promises to get right.
OPTIMIZERS = ("sgd", "adam", "adamw", "nadam", "nadamw", "adamax", "adamaxw", "amsgrad",
              "adabelief", "radam", "yogi", "rmsprop", "adagrad", "lion")
"""The optimiser names a config may use (``optimizer.name``), each tested against Optax."""



# How a difference between a checkpoint's config and the config of the run
# that resumes it is treated (fundl/run/resume.py):
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
                  "decay_matrices_only": "structure",  # the weight decay's mask is part of the optimiser state
                  "b1": "trajectory", "b2": "trajectory", "nesterov": "trajectory", "learning_rate": "trajectory", "weight_decay": "trajectory",
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
    "lora": "structure",  # which params train, and their frozen base
}


def resume_kind(section: str, key: str) -> str:
    """``"structure"``, ``"trajectory"`` or ``"cosmetic"``: see RESUME_KINDS."""
    kind = RESUME_KINDS[section]
    return kind if isinstance(kind, str) else kind[key]
