"""Ensembles and sweeps: N members trained together as one vmapped train state.

An ensemble is not a new kind of run.  Its train state is an ordinary
``TrainState`` whose every leaf carries a leading *member* axis; its step is
``jax.vmap(train_step)``; its batches stack one batch per member on that
axis; its checkpoints, resume, NaN guard and fused steps are the ordinary
ones.  Member ``i`` is defined by its seed (``seed + i``: initialisation,
dropout keys and data order), so it equals a separate run with that seed up
to float32 rounding — a test, not a hope (``tests/test_ensemble.py``).

A *sweep* is an ensemble whose members also differ in numeric optimiser or
schedule settings.  Those are arrays in the optimiser state
(``optax.inject_hyperparams``), one value per member, so all members still
run as one compiled program (``fundl.run.optimizer.optimizer_from_config``
with ``swept=...``).

    members = [{"training.seed": 0}, {"training.seed": 1}]
    loader = MemberLoaders([Loader(x, 100, seed=s, drop_last=True) for s in (0, 1)])
    states = stack_states([create_train_state(model, opt, jax.random.key(s), shape) for s in (0, 1)])
    result = fit(states, jax.vmap(make_train_step(model, opt)), loader, num_steps=1000)
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fundl.data import Loader
from fundl.losses import softmax_cross_entropy
from fundl.metrics import classification_metrics


def stack_states(states: Sequence):
    """Member states (equal tree structure) -> one state with a leading member axis on every leaf
    (one compiled program for the whole tree, not one per leaf shape)."""
    return _stack_leaves(list(states))


@jax.jit
def _stack_leaves(states: list):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def member(state, i: int):
    """Member ``i`` of an ensemble state, as a plain state."""
    return jax.tree.map(lambda x: x[i], state)


class MemberLoaders:
    """Loaders of the members, driven as one: every batch stacks the members' batches on a leading
    member axis (fused groups: ``(K, members, B, ...)``).  The interface is ``Loader``'s that
    ``fundl.train.loop.fit`` uses; members must agree on batch size and epoch length."""

    def __init__(self, loaders: Sequence[Loader]):
        self.loaders = list(loaders)
        if not self.loaders:
            raise ValueError("MemberLoaders: expected at least one loader")
        first = self.loaders[0]
        for i, other in enumerate(self.loaders[1:], 1):
            if (other.batch_size, other.steps_per_epoch) != (first.batch_size, first.steps_per_epoch):
                raise ValueError(
                    f"MemberLoaders: member {i} has batch_size {other.batch_size} and "
                    f"{other.steps_per_epoch} steps per epoch, member 0 {first.batch_size} and "
                    f"{first.steps_per_epoch}; members that differ in shape must be separate runs")
        self.batch_size, self.steps_per_epoch = first.batch_size, first.steps_per_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def batch(self, epoch: int, index: int) -> dict:
        return _stack([ld.batch(epoch, index) for ld in self.loaders], axis=0)

    def state(self) -> dict:
        return {"members": [ld.state() for ld in self.loaders]}

    def state_at_step(self, step: int) -> dict:
        return {"members": [ld.state_at_step(step) for ld in self.loaders]}

    def restore(self, state: dict) -> "MemberLoaders":
        for ld, s in zip(self.loaders, state["members"], strict=True):
            ld.restore(s)
        return self

    def stream_groups(self, sizes) -> "_Zipped":
        sizes = list(sizes)
        return _Zipped([ld.stream_groups(sizes) for ld in self.loaders], sizes)

    def stream(self, num_batches: int | None = None) -> "_Zipped":
        return _Zipped([ld.stream(num_batches) for ld in self.loaders], None)

    def close(self) -> None:
        for ld in self.loaders:
            ld.close()


class _Zipped:
    """The members' iterators advanced together; items stacked on the member axis."""

    def __init__(self, iterators, sizes):
        self.iterators, self.sizes = iterators, iter(sizes) if sizes is not None else None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        k = next(self.sizes) if self.sizes is not None else 1
        items = [next(it) for it in self.iterators]
        return _stack(items, axis=1 if k > 1 else 0)  # a fused group keeps K first: (K, members, B, ...)

    def close(self) -> None:
        for it in self.iterators:
            it.close()


def _stack(batches: list[dict], axis: int) -> dict:
    return {k: np.stack([b[k] for b in batches], axis=axis) for k in batches[0]}


def make_ensemble_eval_step(model, loss_fn: Callable = softmax_cross_entropy, metrics_fn: Callable | None = None,
                            *, compute_dtype="float32"):
    """``eval(params, model_state, batch) -> sums`` for a state with a member axis and one shared
    batch: each member's sums as ``members/<i>/<metric>``, and the ensemble's — the mean of the
    members' probabilities (softmax of their logits) — as ``<metric>``, with the shared ``count``."""
    from fundl.train.step import forward, resolve_dtype

    compute_dtype = resolve_dtype(compute_dtype)
    metrics_fn = classification_metrics() if metrics_fn is None else metrics_fn   # as make_eval_step

    def eval_step(params, model_state, batch):
        def logits_of(p, s):
            out, _ = forward(model, p, s, batch["x"], None, False, compute_dtype)
            return out

        logits = jax.vmap(logits_of)(params, model_state)            # (members, B, ..., classes)
        mask = batch.get("mask")
        mask = jnp.ones(batch["y"].shape[:1], jnp.float32) if mask is None else mask

        def sums(out):
            values = {"loss": loss_fn(out, batch["y"]), **metrics_fn(out, batch["y"])}
            m = lambda v: jnp.sum(v * mask.reshape(mask.shape + (1,) * (v.ndim - 1)))
            return {k: m(v) for k, v in values.items()}

        per_member = jax.vmap(sums)(logits)
        mean_probs = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)
        result = sums(jnp.log(jnp.maximum(mean_probs, jnp.finfo(mean_probs.dtype).tiny)))
        for k, v in per_member.items():
            for i in range(v.shape[0]):
                result[f"members/{i}/{k}"] = v[i]
        per_example = batch["y"][0].size if batch["y"].ndim > 1 else 1
        result["count"] = jnp.sum(mask) * per_example
        return result

    eval_step.model = model  # evaluate checks its data against the model's classes (fundl.train.data_checks)
    return eval_step


def split_members(record: dict, num_members: int) -> dict:
    """Turn ``members/<i>/<metric>`` entries of an eval record into a ``members`` list of dicts."""
    out = {k: v for k, v in record.items() if not k.startswith("members/")}
    members = [{} for _ in range(num_members)]
    for k, v in record.items():
        if k.startswith("members/"):
            _, i, name = k.split("/", 2)
            members[int(i)][name] = v
    out["members"] = members
    return out
