"""The small training loop: ``fit`` and ``evaluate``.

``fit`` runs a compiled step over a :class:`fundl.data.Loader` for a number
of steps, evaluating, logging and checkpointing at chosen intervals.  The
hot loop only dispatches: metrics stay on device and are fetched to the host
once per logging interval (or when a sync is forced for multi-device runs).
Everything about devices goes through a *placement* (see
``fundl.train.parallel``), so the same loop serves one device, ``pmap`` and
sharded ``jit``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fundl.data import Loader
from fundl.metrics import MeanAccumulator
from fundl.train import checkpoint as ckpt
from fundl.train.parallel import SingleDevice, stack_batches
from fundl.train.signals import StopSignals, TrainingInterrupted


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN/Inf; the message names the step, the metric and the last good checkpoint.

    Attributes ``step`` (the first non-finite step), ``metric`` and ``checkpoint``
    (the newest checkpoint written before it, or None).
    """

    def __init__(self, message: str, *, step: int | None = None, metric: str | None = None, checkpoint=None):
        super().__init__(message)
        self.step, self.metric, self.checkpoint = step, metric, checkpoint


def evaluate(eval_fn: Callable, params, model_state, arrays: dict, batch_size: int, *,
             placement=None) -> dict[str, float]:
    """Exact means of the eval step's sums over ``arrays`` (every example once).

    The final short batch is padded to ``batch_size`` and masked, so one
    compiled shape serves the whole set.  ``eval_fn`` is a compiled
    ``make_eval_step`` (``placement.compile_eval``).
    """
    placement = placement or SingleDevice()
    n = len(arrays["y"])
    if n == 0:
        raise ValueError("evaluate: the evaluation set is empty")
    batch_size = min(batch_size, n) if placement.num_devices == 1 else batch_size
    acc = MeanAccumulator()
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in arrays.items()}
        real = len(batch["y"])
        mask = np.ones(batch_size, np.float32)
        if real < batch_size:
            pad = batch_size - real
            batch = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in batch.items()}
            mask[real:] = 0.0
        batch["mask"] = mask
        sums = placement.host_metrics(eval_fn(params, model_state, placement.put_batch(batch)))
        count = float(np.asarray(sums.pop("count")))
        acc.add({k: np.asarray(v) for k, v in sums.items()}, count)
    return acc.means()


@dataclass
class FitResult:
    state: object
    history: list = field(default_factory=list)   # every logged record
    final_eval: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    examples_per_second: float = 0.0
    skipped_updates: int | None = None  # nan_policy="skip": updates skipped for non-finite gradients


def _progress_bar(enabled, total, initial):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)


def fit(state, train_step: Callable, loader: Loader, *, num_steps: int,
        eval_fn: Callable | None = None, eval_every: int = 0,
        log_every: int = 50, run_dir=None, checkpoint_every: int = 0, keep_checkpoints: int = 3,
        checkpoint_extras: dict | None = None, steps_per_call: int = 1, unroll=1,
        nan_policy: str = "stop", progress: bool = True, placement=None,
        on_log: Callable | None = None, resume_hint: str = "") -> FitResult:
    """Train ``state`` with ``train_step`` until ``state.step == num_steps``.

    Args:
      state: a TrainState (possibly restored: training continues from its
        ``step``, and the loader is positioned at the matching batch).
      train_step: the pure step from ``make_train_step``; compiled here.
      loader: a training Loader with ``drop_last=True``; its order depends
        only on (seed, epoch), so step ``t`` always sees the same batch.
      eval_fn: ``eval_fn(state) -> dict`` of eval metrics (e.g. a closure over
        ``evaluate``), run every ``eval_every`` steps and at the end.
      log_every: steps between host transfers of the train metrics.
      run_dir: a ``RunDir`` for metrics.jsonl and checkpoints (or None).
      checkpoint_every: steps between checkpoints (0: only at the end).
      steps_per_call: K optimiser steps fused in one dispatch (``lax.scan``);
        results equal K single steps.
      nan_policy: "stop" raises NonFiniteLossError naming the first step
        whose loss (or another metric) is NaN/Inf; metrics are checked when
        fetched (every ``log_every`` steps) and before every checkpoint, so
        no checkpoint holds a diverged state.  "skip": the optimiser must be
        wrapped in ``optax.apply_if_finite`` (``fundl.experiment`` does it),
        logged means use the finite steps and records carry
        ``skipped_updates``.  "ignore" carries on.
      placement: where the step runs (``fundl.train.parallel``).
      resume_hint: appended to the message of TrainingInterrupted.

    SIGTERM/SIGINT (see ``fundl.train.signals``) save a checkpoint at the next
    step boundary and raise :class:`TrainingInterrupted`.
    """
    placement = placement or SingleDevice()
    if nan_policy not in ("stop", "skip", "ignore"):
        raise ValueError(f"fit: nan_policy must be 'stop', 'skip' or 'ignore', got {nan_policy!r}")
    step_fn = placement.compile_train(train_step, 1)
    multi_fn = placement.compile_train(train_step, steps_per_call, unroll) if steps_per_call > 1 else None
    start_step = int(jax.device_get(placement.get_state(state).step))
    if start_step > num_steps:
        raise ValueError(f"fit: the state is at step {start_step}, past num_steps={num_steps}; a resumed run "
                         f"cannot end before its checkpoint: raise training.steps/epochs or use a new run dir")
    loader.restore(loader.state_at_step(start_step))
    batches = loader.stream(num_steps - start_step)
    state = placement.put_state(state)
    batch_size = loader.batch_size
    history = []
    pending = []     # (device metrics, steps in the dispatch, step before it): not yet on the host
    host_rows = []   # per-step host metrics fetched and checked, not yet logged
    last_ckpt, last_ckpt_step = None, None
    bar = _progress_bar(progress, num_steps, start_step)
    step = start_step
    t0 = time.perf_counter()
    t_log, steps_since_log = t0, 0
    dispatches = 0

    def boundaries(s):
        """Steps at which something must happen after step s (events end fused chunks)."""
        nxt = [num_steps]
        for every in (log_every, eval_every, checkpoint_every):
            if every:
                nxt.append((s // every + 1) * every)
        return min(nxt)

    def fetch_and_check():
        """Move pending metrics to the host; under "stop", raise at the first non-finite step."""
        for m, n, before in pending:
            m = placement.host_metrics(m)
            row = {k: np.asarray(v).reshape(n, -1).mean(axis=1) if n > 1 else np.asarray(v).reshape(1)
                   for k, v in m.items()}
            if nan_policy == "stop":
                _raise_if_non_finite(row, before, last_ckpt)
            host_rows.append(row)
        pending.clear()

    def flush_metrics():
        nonlocal host_rows, t_log, steps_since_log
        fetch_and_check()
        if not host_rows:
            return None
        per_step = {k: np.concatenate([r[k] for r in host_rows]) for k in host_rows[0]}
        means = {k: _mean(v, finite_only=nan_policy == "skip") for k, v in per_step.items()}
        if nan_policy == "skip":
            skipped = skipped_updates(placement.get_state(state.opt_state))  # a few counters, not the state
            if skipped is not None:
                means["skipped_updates"] = skipped
        now = time.perf_counter()
        means["examples_per_second"] = steps_since_log * batch_size / max(now - t_log, 1e-9)
        t_log, steps_since_log = now, 0
        host_rows = []
        return means

    def log_train(means):
        record = {"step": step, "epoch": (step - 1) // loader.steps_per_epoch, "split": "train", **means}
        history.append(record)
        if run_dir is not None:
            run_dir.log(record)
        if bar is not None:
            bar.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{means.get('accuracy', float('nan')):.3f}",
                            ex_s=f"{means['examples_per_second']:.0f}")
        if on_log is not None:
            on_log(record)

    def save(s):
        nonlocal last_ckpt, last_ckpt_step
        if run_dir is None or last_ckpt_step == s:
            return
        fetch_and_check()  # never checkpoint a state that already went non-finite
        host_state = placement.get_state(state)
        if nan_policy == "stop" and not bool(_all_finite(host_state)):
            where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written before it"
            raise NonFiniteLossError(
                f"non-finite parameters or optimiser state after step {s} (the training loss was still finite); "
                f"{where}. Lower the learning rate, clip gradients (optimizer.clip_norm) or set "
                f"training.nan_policy='skip'.", step=s, metric="params", checkpoint=last_ckpt)
        extras = {"loader": loader.state_at_step(s), **(checkpoint_extras or {})}
        if getattr(run_dir, "writer", True):
            last_ckpt = ckpt.save(run_dir.checkpoint_dir, host_state, step=s, extras=extras, keep=keep_checkpoints)
        else:  # process 0 writes it (the barrier below waits for that)
            last_ckpt = run_dir.checkpoint_dir / ckpt.checkpoint_name(s)
        last_ckpt_step = s
        placement.barrier(f"checkpoint_{s}")

    stop = StopSignals()
    try:
        with stop:
            while step < num_steps:
                chunk = min(boundaries(step), num_steps) - step
                before = step
                if multi_fn is not None and chunk >= steps_per_call:
                    group = [next(batches) for _ in range(steps_per_call)]
                    state, metrics = multi_fn(state, placement.put_batch(stack_batches(group), stacked=True))
                    n = steps_per_call
                else:
                    state, metrics = step_fn(state, placement.put_batch(next(batches)))
                    n = 1
                pending.append((metrics, n, before))
                step += n
                steps_since_log += n
                dispatches += 1
                if placement.sync_every and dispatches % placement.sync_every == 0:
                    jax.block_until_ready(metrics)
                if bar is not None:
                    bar.update(n)

                is_last = step == num_steps
                if (log_every and step % log_every == 0) or is_last:
                    means = flush_metrics()
                    if means is not None:
                        log_train(means)
                if eval_fn is not None and ((eval_every and step % eval_every == 0) or is_last):
                    results = eval_fn(placement.get_state(state))
                    record = {"step": step, "epoch": (step - 1) // loader.steps_per_epoch, "split": "eval", **results}
                    history.append(record)
                    if run_dir is not None:
                        run_dir.log(record)
                    if on_log is not None:
                        on_log(record)
                if (checkpoint_every and step % checkpoint_every == 0) or is_last:
                    save(step)
                if not is_last and stop.should_stop(dispatches):
                    means = flush_metrics()
                    if means is not None:
                        log_train(means)
                    save(step)
                    hint = resume_hint or ("resume from this checkpoint" if run_dir is not None else "")
                    raise TrainingInterrupted(stop.received, step, last_ckpt if run_dir is not None else None, hint)
            if eval_fn is not None and start_step == num_steps:  # resumed a finished run: report its eval
                history.append({"step": step, "split": "eval", **eval_fn(placement.get_state(state))})
        jax.block_until_ready(state)
    finally:
        batches.close()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    final_eval = next((r for r in reversed(history) if r["split"] == "eval"), {})
    done = num_steps - start_step
    final_state = placement.get_state(state)
    skipped = skipped_updates(final_state.opt_state) if hasattr(final_state, "opt_state") else None
    return FitResult(final_state, history, final_eval, seconds,
                     done * batch_size / seconds if seconds > 0 else 0.0, skipped)


def _mean(values: np.ndarray, finite_only: bool) -> float:
    if finite_only:
        ok = np.isfinite(values)
        if ok.any():
            values = values[ok]
    return float(np.mean(values))


def _raise_if_non_finite(row: dict, before: int, last_ckpt) -> None:
    """``row``: per-step metrics of the steps ``before + 1, before + 2, ...``."""
    names = ["loss"] + sorted(k for k in row if k != "loss")
    for i in range(len(row["loss"])):
        for k in names:
            value = float(row[k][i])
            if not math.isfinite(value):
                step = before + i + 1
                where = (f"the last good checkpoint is {last_ckpt}" if last_ckpt
                         else "no checkpoint was written before it")
                raise NonFiniteLossError(
                    f"non-finite training {k} ({value}) at step {step} (metric '{k}'); {where}. "
                    f"Lower the learning rate, clip gradients (optimizer.clip_norm) or set "
                    f"training.nan_policy='skip' to skip such updates.", step=step, metric=k, checkpoint=last_ckpt)


@jax.jit
def _all_finite(tree) -> jax.Array:
    """True when every float leaf of ``tree`` is finite (one small reduction on device)."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def skipped_updates(opt_state) -> int | None:
    """Updates skipped for non-finite gradients so far: ``total_notfinite`` of every
    ``optax.apply_if_finite`` state in ``opt_state`` (None if there is none)."""
    found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState))
             if isinstance(x, optax.ApplyIfFiniteState)]
    if not found:
        return None
    return int(sum(int(np.asarray(jax.device_get(x.total_notfinite)).reshape(-1)[0]) for x in found))
