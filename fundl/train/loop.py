"""The small training loop: ``fit`` and ``evaluate``.

``fit`` runs a compiled step over a :class:`fundl.data.Loader` for a number
of steps, evaluating, logging and checkpointing at chosen intervals.  The
hot loop only dispatches: metrics stay on device and are fetched to the host
once per logging interval (or when a sync is forced for multi-device runs).
Everything about devices goes through a *placement* (see
``fundl.train.placement``), so the same loop serves one device, ``pmap`` and
sharded ``jit``.
"""

from __future__ import annotations

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
from fundl.train.placement import single_device
from fundl.train.signals import StopSignals, TrainingInterrupted
from fundl.train.step import resolve_fusion, step_family


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
    ``make_eval_step`` (``placement.compile_eval``).  ``arrays`` is a split,
    ``{"x": (N, ...), "y": (N,)}``; returns ``{"loss": ..., "accuracy": ...}``
    (the eval step's metrics) as Python floats.

    Examples:
        >>> from fundl.train.loop import evaluate
        >>> from fundl.train.step import make_eval_step
        >>> model = models.mlp([8], 3)
        >>> params, model_state, _ = model.init(jax.random.key(0), (1, 4))
        >>> test = {"x": np.ones((250, 4), np.float32), "y": np.zeros(250, np.int32)}
        >>> means = evaluate(jax.jit(make_eval_step(model)), params, model_state, test, batch_size=100)
        >>> sorted(means)                                   # over 100 + 100 + 50 (padded) examples
        ['accuracy', 'loss']
    """
    placement = placement or single_device()
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
    """What :func:`fit` returns: the trained state, every logged record and the timings.

    ``history`` holds the records also written to ``metrics.jsonl`` (dicts with
    ``step``, ``epoch``, ``split`` and the metrics); ``final_eval`` is the last
    ``"eval"`` record (``{}`` without ``eval_fn``); ``steps_per_call`` and
    ``unroll`` are what ``"auto"`` resolved to.
    """

    state: object
    history: list = field(default_factory=list)   # every logged record
    final_eval: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    examples_per_second: float = 0.0
    skipped_updates: int | None = None  # nan_policy="skip": updates skipped for non-finite gradients
    steps_per_call: int = 1  # what "auto" resolved to (optimiser steps fused per dispatch)
    unroll: bool | int = 1
    compile_seconds: float = 0.0  # of train_seconds: the first call of each compiled step (trace + compile)


def _progress_bar(enabled, total, initial):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)


def fit(state, train_step: Callable, loader: Loader, *, num_steps: int,
        eval_fn: Callable | None = None, eval_every: int = 0,
        log_every: int = 50, run_dir=None, checkpoint_every: int = 0, keep_checkpoints: int = 3,
        checkpoint_extras: dict | None = None, steps_per_call: int | str = "auto", unroll="auto",
        nan_policy: str = "stop", progress: bool = True, placement=None,
        on_log: Callable | None = None, resume_hint: str = "", async_checkpoints: bool = True) -> FitResult:
    """Train ``state`` with ``train_step`` until ``state.step == num_steps``.

    Args:
      state: a TrainState (possibly restored: training continues from its
        ``step``, and the loader is positioned at the matching batch).  It is
        copied on entry, so the caller's arrays stay valid although the
        compiled step donates its input buffers.
      train_step: the pure step from ``make_train_step``; compiled here.
      loader: a training Loader with ``drop_last=True``; its order depends
        only on (seed, epoch), so step ``t`` always sees the same batch.
      eval_fn: ``eval_fn(state) -> dict`` of eval metrics (e.g. a closure over
        ``evaluate``), run every ``eval_every`` steps and at the end.  It gets
        the state as the placement holds it on the devices, not a host copy:
        the ordinary state with one device; under pmap the broadcast state
        (leading device axis), under sharding the replicated one.
        ``placement.eval_params(state)`` gives the ``(params, model_state)``
        that ``placement.compile_eval``'s function takes, with no copy;
        ``placement.get_state(state)`` gives a plain copy.  The state is valid
        only during the call: the next step donates its buffers.
      log_every: steps between host transfers of the train metrics.
      run_dir: a ``RunDir`` for metrics.jsonl and checkpoints (or None).
      checkpoint_every: steps between checkpoints (0: only at the end).
      checkpoint_extras: JSON-serialisable dict stored in every checkpoint's
        manifest (``fundl.experiment`` stores the resolved config and a run id;
        a ``run_id`` limits keep-K pruning to this run's checkpoints).
      steps_per_call: K optimiser steps fused in one dispatch (``lax.scan``);
        results equal K single steps.  ``"auto"`` (the default) picks by what
        the step computes (``fundl.train.step.AUTO_STEPS_PER_CALL``: one step
        per dispatch for convolutions on XLA:CPU, fused otherwise), as
        measured through ``fit`` by ``scripts/benchmark.py --end-to-end``.
      unroll: ``lax.scan`` unroll of fused steps; ``"auto"``: fully for
        convolutions, rolled otherwise (``make_multi_step``).
      nan_policy: "stop" raises NonFiniteLossError naming the first step
        whose loss (or another metric) is NaN/Inf; metrics are checked when
        fetched (every ``log_every`` steps) and before every checkpoint, so
        no checkpoint holds a diverged state.  "skip": the optimiser must be
        wrapped in ``optax.apply_if_finite`` (``fundl.experiment`` does it),
        logged means use the finite steps and records carry
        ``skipped_updates``.  "ignore" carries on.
      placement: where the step runs (``fundl.train.placement``).
      on_log: called with every record (train and eval) as it is logged.
      resume_hint: appended to the message of TrainingInterrupted.
      async_checkpoints: write checkpoints in the background while training
        continues (``fundl.train.checkpoint.Checkpointer``); the next save, the
        end of ``fit``, a stop signal and an error wait for the pending one, so
        every checkpoint ``fit`` reports is committed.  False: each save
        blocks until committed.

    SIGTERM/SIGINT (see ``fundl.train.signals``) save a checkpoint at the next
    step boundary and raise :class:`TrainingInterrupted`.

    Returns a :class:`FitResult`.  The guide docs/training.md shows ``fit`` with
    evaluation, a run directory and checkpoints.

    Examples:
        >>> from fundl.data import Loader
        >>> from fundl.train.loop import fit
        >>> from fundl.train.optim import make_optimizer
        >>> from fundl.train.state import create_train_state
        >>> from fundl.train.step import make_train_step
        >>> model, opt = models.mlp([8], 3), make_optimizer("adam", 1e-2)
        >>> state = create_train_state(model, opt, jax.random.key(0), (1, 4))
        >>> rng = np.random.default_rng(0)
        >>> train = {"x": rng.normal(size=(256, 4)).astype(np.float32), "y": rng.integers(0, 3, 256).astype(np.int32)}
        >>> loader = Loader(train, batch_size=32, drop_last=True)
        >>> result = fit(state, make_train_step(model, opt), loader, num_steps=20, log_every=10, progress=False)
        >>> int(result.state.step), [r["step"] for r in result.history]
        (20, [10, 20])
    """
    if nan_policy not in ("stop", "skip", "ignore"):
        raise ValueError(f"fit: nan_policy must be 'stop', 'skip' or 'ignore', got {nan_policy!r}")
    placement = placement or single_device()
    start_step = int(np.asarray(jax.device_get(placement.get_state(state).step)).reshape(-1)[0])  # ensembles: (members,)
    if start_step > num_steps:
        raise ValueError(f"fit: the state is at step {start_step}, past num_steps={num_steps}; a resumed run "
                         f"cannot end before its checkpoint: raise training.steps/epochs or use a new run dir")
    loop = _Loop(placement, loader, num_steps=num_steps, start_step=start_step, eval_fn=eval_fn,
                 intervals=(log_every, eval_every, checkpoint_every), run_dir=run_dir,
                 keep_checkpoints=keep_checkpoints, checkpoint_extras=checkpoint_extras or {},
                 nan_policy=nan_policy, on_log=on_log, resume_hint=resume_hint,
                 async_checkpoints=async_checkpoints)
    return loop.run(state, train_step, steps_per_call, unroll, progress)


def _packed_metrics(train_step):
    """The step with its metrics packed into one float32 array (metrics on the last axis), and
    their names.

    Fetching metrics costs ~30 us of host time per array, per step: one array
    instead of one per metric halves that for the usual loss + accuracy.  The
    names are filled in when the step is first traced; metrics of different
    shapes are left as they are (``names`` stays empty).  An ensemble's
    metrics have a member axis: shape (members,) each.
    """
    names: list[str] = []

    def step(state, batch):
        state, metrics = train_step(state, batch)
        if len({jnp.shape(v) for v in metrics.values()}) != 1:
            return state, metrics
        names[:] = sorted(metrics)
        return state, jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in names], axis=-1)

    return step, names


class _TrainMetrics:
    """Per-step train metrics between two logs: on the device until fetched, then checked and averaged."""

    def __init__(self, placement, nan_policy: str, names: list[str]):
        self.placement, self.nan_policy, self.names = placement, nan_policy, names
        self.pending = []   # (device metrics, steps in the dispatch, step before it)
        self.rows = []      # per-step host metrics, fetched and checked
        self.steps = 0      # steps since the last log, for examples/s
        self.since = time.perf_counter()

    def add(self, metrics, n: int, before: int) -> None:
        self.pending.append((metrics, n, before))
        self.steps += n

    def fetch(self, last_checkpoint) -> None:
        """Move pending metrics to the host; under "stop", raise at the first non-finite step."""
        fetched = self.placement.host_metrics([m for m, _, _ in self.pending])  # one transfer call, overlapped
        for m, (_, n, before) in zip(fetched, self.pending):
            if self.names:  # packed by _packed_metrics: one array per dispatch
                m = {k: np.asarray(m)[..., i] for i, k in enumerate(self.names)}
            # (n, *S): n steps, each a scalar (S = ()) or one value per ensemble member (S = (members,))
            row = {k: np.asarray(v) if n > 1 else np.asarray(v)[None] for k, v in m.items()}
            if self.nan_policy == "stop":
                _raise_if_non_finite(row, before, last_checkpoint)
            self.rows.append(row)
        self.pending.clear()

    def means(self, batch_size: int, last_checkpoint) -> dict | None:
        """Means over the steps since the last call (None if there were none), plus examples/s."""
        self.fetch(last_checkpoint)
        if not self.rows:
            return None
        per_step = {k: np.concatenate([r[k] for r in self.rows]) for k in self.rows[0]}
        skip = self.nan_policy == "skip"
        means = {k: _mean(v, finite_only=skip) for k, v in per_step.items()}
        if any(v.ndim > 1 for v in per_step.values()):  # an ensemble: the mean, and each member's
            members = {k: [_mean(col, finite_only=skip) for col in v.T] for k, v in per_step.items()}
            means["members"] = [dict(zip(members, vals)) for vals in zip(*members.values())]
        now = time.perf_counter()
        means["examples_per_second"] = self.steps * batch_size / max(now - self.since, 1e-9)
        self.rows, self.steps, self.since = [], 0, now
        return means


class _Loop:
    """One ``fit`` call: the dispatch loop and the events at step boundaries (log, eval, checkpoint, stop)."""

    def __init__(self, placement, loader, *, num_steps, start_step, eval_fn, intervals, run_dir,
                 keep_checkpoints, checkpoint_extras, nan_policy, on_log, resume_hint, async_checkpoints=True):
        self.placement, self.loader = placement, loader
        self.num_steps, self.start_step, self.step = num_steps, start_step, start_step
        self.eval_fn = eval_fn
        self.log_every, self.eval_every, self.checkpoint_every = intervals
        self.run_dir, self.keep, self.extras = run_dir, keep_checkpoints, checkpoint_extras
        self.nan_policy, self.on_log, self.resume_hint = nan_policy, on_log, resume_hint
        self.metrics = None  # set by run, once the metric names are known
        self.history: list[dict] = []
        self.last_ckpt, self.last_ckpt_step = None, None
        self.async_checkpoints = async_checkpoints
        self.saver = None  # a ckpt.Checkpointer while run() runs with a run directory
        self.bar = None
        self.state = None

    # ------------------------------------------------------------- driver
    def run(self, state, train_step, steps_per_call, unroll, progress) -> FitResult:
        p = self.placement
        if "auto" in (steps_per_call, unroll):
            first = self.loader.batch(0, 0)
            family = step_family(train_step, state, first, axis_name=p.axis_name)
            steps_per_call, unroll = resolve_fusion(steps_per_call, unroll, family)
        else:
            steps_per_call, unroll = resolve_fusion(steps_per_call, unroll, "dense")
        train_step, names = _packed_metrics(train_step)
        self.metrics = _TrainMetrics(p, self.nan_policy, names)
        step_fn = p.compile_train(train_step, 1)
        multi_fn = p.compile_train(train_step, steps_per_call, unroll) if steps_per_call > 1 else None
        self.loader.restore(self.loader.state_at_step(self.start_step))
        plan = self._dispatch_plan(steps_per_call)
        batches = self.loader.stream_groups(plan)  # K batches of a fused call gathered at once
        self.state = p.put_state(state)  # a copy: the caller's arrays survive donation
        self.bar = _progress_bar(progress, self.num_steps, self.start_step)
        if self.run_dir is not None:  # every process: each writes its own shards
            self.saver = ckpt.Checkpointer(self.run_dir.checkpoint_dir, keep=self.keep,
                                           async_save=self.async_checkpoints)
        stop = StopSignals()
        dispatches, compile_seconds, uncompiled = 0, 0.0, {step_fn, multi_fn}
        t0 = time.perf_counter()
        try:
            with stop:
                for n in plan:
                    before = self.step
                    fn = multi_fn if n > 1 else step_fn
                    batch = p.put_batch(next(batches), stacked=n > 1)
                    t_call = time.perf_counter()
                    self.state, metrics = fn(self.state, batch)
                    if fn in uncompiled:  # the first call traces and compiles (later ones only dispatch)
                        compile_seconds += time.perf_counter() - t_call
                        uncompiled.discard(fn)
                    self.metrics.add(metrics, n, before)
                    self.step += n
                    dispatches += 1
                    if p.sync_every and dispatches % p.sync_every == 0:
                        jax.block_until_ready(metrics)
                    if self.bar is not None:
                        self.bar.update(n)
                    self._events()
                    if self.step < self.num_steps and stop.should_stop(dispatches):
                        self._interrupted(stop.received)
                if self.eval_fn is not None and self.start_step == self.num_steps:
                    self._evaluate()  # resumed a finished run: report its evaluation
            jax.block_until_ready(self.state)
            if self.saver is not None:
                self.saver.close()  # the last checkpoint committed (or its error raised)
        except BaseException as e:
            if self.saver is not None:  # errors, too, leave no save half done
                pending = self.saver.pending
                try:  # several processes: bounded, a dead peer may never finish its part of the save
                    self.saver.close(None if jax.process_count() == 1 else _PENDING_SAVE_ON_ERROR_S)
                except BaseException as late:  # noqa: BLE001 - reported on the error on its way out
                    if late is not e:
                        e.add_note(f"(the pending checkpoint {pending} failed too: {late})")
            raise
        finally:
            batches.close()
            if self.bar is not None:
                self.bar.close()
        seconds = time.perf_counter() - t0
        final_state = p.get_state(self.state)
        final_eval = next((r for r in reversed(self.history) if r["split"] == "eval"), {})
        done = self.num_steps - self.start_step
        skipped = skipped_updates(final_state.opt_state) if hasattr(final_state, "opt_state") else None
        return FitResult(final_state, self.history, final_eval, seconds,
                         done * self.loader.batch_size / seconds if seconds > 0 else 0.0, skipped,
                         steps_per_call, unroll, compile_seconds)

    def _dispatch_plan(self, steps_per_call: int) -> list[int]:
        """Optimiser steps per dispatch until ``num_steps``: K where K fit before the next event
        (log, eval, checkpoint: fused calls end there), else single steps."""
        plan, s = [], self.start_step
        while s < self.num_steps:
            nxt = [self.num_steps] + [(s // every + 1) * every for every in
                                      (self.log_every, self.eval_every, self.checkpoint_every) if every]
            n = steps_per_call if min(nxt) - s >= steps_per_call else 1
            plan.append(n)
            s += n
        return plan

    # ------------------------------------------------------------- events
    def _events(self) -> None:
        s, last = self.step, self.step == self.num_steps
        if (self.log_every and s % self.log_every == 0) or last:
            self._log_train()
        if self.eval_fn is not None and ((self.eval_every and s % self.eval_every == 0) or last):
            self._evaluate()
        if (self.checkpoint_every and s % self.checkpoint_every == 0) or last:
            self._save()

    def _record(self, split: str, values: dict) -> dict:
        """The one place a record is built and sent: history, metrics.jsonl, progress bar, ``on_log``."""
        record = {"step": self.step, "epoch": (self.step - 1) // self.loader.steps_per_epoch if self.step else 0,
                  "split": split, **values}
        self.history.append(record)
        if self.run_dir is not None:
            self.run_dir.log(record)
        if self.bar is not None and split == "train":
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values.get('accuracy', float('nan')):.3f}",
                                 ex_s=f"{values['examples_per_second']:.0f}")
        if self.on_log is not None:
            self.on_log(record)
        return record

    def _log_train(self) -> None:
        means = self.metrics.means(self.loader.batch_size, self.last_ckpt)
        if means is None:
            return
        if self.nan_policy == "skip":
            skipped = skipped_updates(self.placement.get_state(self.state.opt_state))  # a few counters
            if skipped is not None:
                means["skipped_updates"] = skipped
        self._record("train", means)

    def _evaluate(self) -> None:
        self._record("eval", self.eval_fn(self.state))  # on the devices as it is: no host round trip

    def _save(self) -> None:
        s = self.step
        if self.run_dir is None or self.last_ckpt_step == s:
            return
        self.metrics.fetch(self.last_ckpt)  # never checkpoint a state that already went non-finite
        if self.nan_policy == "stop" and not bool(_all_finite(self.state)):  # on the devices, as placed
            raise _non_finite_error("parameters or optimiser state", None, s, "params", self.last_ckpt,
                                    "the training loss was still finite")
        extras = {"loader": self.loader.state_at_step(s), **self.extras}
        saveable = self.placement.saveable(self.state)
        # Every process passes the global state (Orbax writes each one's shards); this returns once
        # the device buffers are copied, and waits for the previous save's commit first.
        self.last_ckpt = self.saver.save(saveable, step=s, extras=extras)
        self.last_ckpt_step = s

    def _interrupted(self, signum) -> None:
        """A stop signal arrived: log, save at this step boundary and raise TrainingInterrupted."""
        self._log_train()
        self._save()
        saved = self.run_dir is not None
        if saved:
            self.saver.wait()  # the checkpoint it names is committed
        hint = self.resume_hint or ("resume from this checkpoint" if saved else "")
        raise TrainingInterrupted(signum, self.step, self.last_ckpt if saved else None, hint)


_PENDING_SAVE_ON_ERROR_S = 10.0  # multi-process runs: how long an error waits for a pending checkpoint


def _mean(values: np.ndarray, finite_only: bool) -> float:
    if finite_only:
        ok = np.isfinite(values)
        if ok.any():
            values = values[ok]
    return float(np.mean(values))


def _non_finite_error(what: str, value, step: int, metric: str, last_ckpt, note: str = "") -> "NonFiniteLossError":
    """The one message for a diverged run: what went non-finite, where, the last good checkpoint, what to do."""
    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written before it"
    got = f" ({value})" if value is not None else ""
    at = f"at step {step} (metric '{metric}')" if value is not None else f"after step {step}"
    note = f" ({note})" if note else ""
    return NonFiniteLossError(
        f"non-finite {what}{got} {at}{note}; {where}. Lower the learning rate, clip gradients "
        f"(optimizer.clip_norm) or set training.nan_policy='skip' to skip such updates.",
        step=step, metric=metric, checkpoint=last_ckpt)


def _raise_if_non_finite(row: dict, before: int, last_ckpt) -> None:
    """``row``: per-step metrics of the steps ``before + 1, before + 2, ...`` (an ensemble's with a
    member axis after the step axis)."""
    if all(np.isfinite(v).all() for v in row.values()):  # the usual case: one check per metric, not per step
        return
    names = ["loss"] + sorted(k for k in row if k != "loss")
    for i in range(len(row["loss"])):
        for k in names:
            values = np.asarray(row[k][i], np.float64).reshape(-1)
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                what = f"training {k}" + (f" of ensemble member {bad[0]}" if np.ndim(row[k][i]) else "")
                raise _non_finite_error(what, float(values[bad[0]]), before + i + 1, k, last_ckpt)


@jax.jit
def _all_finite(tree) -> jax.Array:
    """True when every float leaf of ``tree`` is finite (one small reduction on device)."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def skipped_updates(opt_state) -> int | None:
    """Updates skipped for non-finite gradients so far: ``total_notfinite`` of every
    ``optax.apply_if_finite`` state in ``opt_state``, summed over ensemble members
    (None if there is none).  ``opt_state`` is the host copy (``placement.get_state``)."""
    found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState))
             if isinstance(x, optax.ApplyIfFiniteState)]
    if not found:
        return None
    return int(sum(int(np.asarray(jax.device_get(x.total_notfinite)).sum()) for x in found))
