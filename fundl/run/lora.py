"""A config's ``[lora]`` section: fine-tune a trained run's params through LoRA adapters.

With ``lora.init_from = RUN_DIR`` the run's model is ``[model]`` adapted by
``fundl.transforms.lora.adapt`` (rank ``lora.rank``, scale ``lora.alpha /
lora.rank``, on the parameters ``lora.targets`` matches), its frozen base
the params of RUN_DIR's newest valid checkpoint.  The train state's params
(and so the optimiser state) are the adapters; the base params ride in the
model state, unchanged by every step (docs/transforms.md, "LoRA").  The
config's ``[model]`` must build the base run's model: a parameter whose shape
differs is a ConfigError listing it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from fundl.nn import Layer, abstract_init
from fundl.run.config import ConfigError
from fundl.train import checkpoint as ckpt
from fundl.transforms import lora


def enabled(config: dict) -> bool:
    """Whether ``config`` fine-tunes a run through LoRA (``lora.init_from`` is set)."""
    return bool(config["lora"]["init_from"])


def adapted_model(config: dict, model: Layer) -> Layer:
    """``model`` adapted as ``[lora]`` says (a :func:`fundl.transforms.lora.adapt` Layer)."""
    c = config["lora"]
    try:
        return lora.adapt(model, rank=c["rank"], alpha=c["alpha"], targets=c["targets"])
    except lora.LoRAError as e:
        raise ConfigError(f"[lora]: {e}") from None


def base_params(config: dict, model: Layer, input_shape) -> dict:
    """The params of ``lora.init_from``'s newest valid checkpoint, as the params tree of ``model``
    (the plain model of ``[model]``) on ``input_shape`` (batch included)."""
    run_dir = Path(config["lora"]["init_from"])
    path = ckpt.latest_valid(run_dir / "checkpoints")
    if path is None:
        raise ConfigError(f"lora.init_from = {str(run_dir)!r}: no valid checkpoint in {run_dir / 'checkpoints'}; "
                          f"name the run directory of a finished (or checkpointed) run")
    template, _, _ = abstract_init(model, tuple(input_shape))
    try:
        lora.target_paths(template, config["lora"]["targets"])
    except lora.LoRAError as e:
        raise ConfigError(f"lora.targets: {e}") from None
    stored = ckpt.load_arrays(path)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    values, wrong = [], []
    for p, leaf in leaves:
        name = "params/" + lora.leaf_path(p)
        got = stored.get(name)
        if got is None or got.shape != tuple(leaf.shape) or got.dtype != np.dtype(leaf.dtype):
            have = "missing" if got is None else f"{got.shape} {got.dtype}"
            wrong.append(f"{name}: the model has {tuple(leaf.shape)} {np.dtype(leaf.dtype)}, the checkpoint {have}")
        values.append(got)
    if wrong:
        raise ConfigError(f"lora.init_from = {str(run_dir)!r}: its checkpoint {path.name} does not hold the params "
                          f"of this config's [model] (give [model] the base run's settings; an ensemble's or "
                          f"a LoRA run's checkpoint cannot be a base):\n  " + "\n  ".join(wrong[:5]))
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(v) for v in values])


def with_base(state, base: dict):
    """A train state of the adapted model with ``base`` as its frozen params."""
    return state.replace(model_state=lora.set_base(state.model_state, base))
