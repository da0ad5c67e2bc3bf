"""Evaluation on a run's test split: during training (``fit``'s ``eval_fn``) and afterwards
(``fundl-evaluate`` / ``scripts/evaluate.py``: a run directory's newest valid checkpoint)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from fundl.data import Dataset, Loader
from fundl.losses import softmax_cross_entropy
from fundl.metrics import classification_metrics
from fundl.run import sweeps
from fundl.run.build import initial_state, load_data, single_device
from fundl.run.config import load_config
from fundl.train import checkpoint as ckpt
from fundl.train.ensemble import make_ensemble_eval_step, split_members
from fundl.train.loop import evaluate
from fundl.train.state import TrainState
from fundl.train.step import make_eval_step


def make_evaluator(config: dict, model, data: Dataset, placement, num_members: int = 1, warm_state=None):
    """``eval_fn(state) -> dict``: exact test-split means for a state as ``fit`` holds it.  For an
    ensemble: the ensemble's prediction (mean of the members' probabilities) and ``members``, a
    list of each member's.

    With ``warm_state`` (the train state about to be trained), the eval step is compiled here by
    evaluating that state on one batch of the test split: a broken evaluation fails before
    training starts, and the first evaluation does not stop training to compile (what that cost
    is in docs/benchmarks.md, "End to end")."""
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


def restore_newest(run_dir: Path, config: dict, data: Dataset):
    """The run's model and the train state of its newest valid checkpoint: ``(model, state, manifest,
    path)``.  Corrupt newer checkpoints are skipped with one warning line each on stderr."""
    steps_per_epoch = len(Loader(data.train, config["training"]["batch_size"], drop_last=True, prefetch=0))
    model, _, template = initial_state(config, data, steps_per_epoch)
    with warnings.catch_warnings(record=True) as skipped:  # corrupt newer checkpoints, printed plainly
        warnings.simplefilter("always")
        path = ckpt.latest_valid(run_dir / "checkpoints")
    for w in skipped:
        print(f"fundl: warning: {w.message}", file=sys.stderr)
    if path is None:
        if (run_dir / "members").is_dir():
            raise ckpt.CheckpointError(f"{run_dir} is a sweep of separate runs: use each of "
                                       f"{run_dir / 'members'}/<k>")
        raise ckpt.CheckpointError(f"no checkpoint in {run_dir / 'checkpoints'}")
    state, manifest = ckpt.restore(path, template)
    return model, state, manifest, path


def evaluate_run(run_dir: str | Path) -> dict:
    """The newest valid checkpoint of ``run_dir`` evaluated on the test split of its config's data, on
    one device: ``{"checkpoint", "step", "test_accuracy", "test_loss"}`` (and ``members`` for an
    ensemble).  Corrupt newer checkpoints are skipped with a warning on stderr."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.toml")
    data = load_data(config)
    model, state, manifest, path = restore_newest(run_dir, config, data)
    num_members = len(sweeps.members(config))
    results = make_evaluator(config, model, data, single_device(), num_members)(state)
    out = {"checkpoint": str(path), "step": manifest["step"],
           "test_accuracy": results["accuracy"], "test_loss": results["loss"]}
    if num_members > 1:  # the ensemble's prediction above; each member here
        out["members"] = [{"test_accuracy": m["accuracy"], "test_loss": m["loss"]} for m in results["members"]]
    return out
