"""The small training loop: ``fit`` and ``evaluate``.

``fit`` runs a compiled step over a :class:`fundl.data.Loader` up to a step
number, logging, evaluating and checkpointing at the intervals of
:class:`Every`.  It reads top to bottom in sections (setup, data, compile,
the loop with its events, finish); each domain rule lives elsewhere, in one
place: how many steps a dispatch runs (``fundl.train.fusion``), where arrays
live (a *placement*, ``fundl.train.placement``: one device, ``pmap`` and
sharded ``jit`` run the same loop), how checkpoints are written (the
caller's ``fundl.train.checkpoint.Checkpointer``), where records go (the
caller's ``on_log``).  The hot loop only dispatches: metrics stay on the
device and are fetched once per logging interval (or when a multi-device
placement forces a sync).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fundl.data import Loader
from fundl.metrics import MeanAccumulator
from fundl.train.checkpoint import Checkpointer
from fundl.train.compile_cache import enable_compilation_cache
from fundl.train.data_checks import check_split, loader_splits
from fundl.train.fusion import Fusion, resolve
from fundl.train.placement import single_device
from fundl.train.signals import StopSignals, TrainingInterrupted
from fundl.train.state import current_step

NAN_POLICIES = ("stop", "skip", "ignore")
"""What ``fit`` does when training goes non-finite (see :func:`fit`)."""


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN/Inf; the message names the step, the metric and the last good checkpoint.

    Attributes ``step`` (the first non-finite step), ``metric`` and ``checkpoint``
    (the newest checkpoint written before it, or None).
    """

    def __init__(self, message: str, *, step: int | None = None, metric: str | None = None, checkpoint=None):
        super().__init__(message)
        self.step, self.metric, self.checkpoint = step, metric, checkpoint


@dataclass(frozen=True)
class Every:
    """Intervals of ``fit``'s events, in optimiser steps; 0: only at the end of ``fit``.

    ``log``: train metrics fetched, averaged and logged; ``eval``: ``eval_fn`` run;
    ``checkpoint``: the state saved.  Each also happens at the last step.  A fused call
    (``fundl.train.fusion``) never runs across one of these steps.
    """

    log: int = 50
    eval: int = 0
    checkpoint: int = 0

    def __post_init__(self):
        for name in ("log", "eval", "checkpoint"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Every.{name} must be an int >= 0 (0: only at the end), got {value!r}")


def evaluate(eval_fn: Callable, params, model_state, arrays: dict, batch_size: int, *,
             placement=None) -> dict[str, float]:
    """Exact means of the eval step's sums over ``arrays`` (every example once).

    The final short batch is padded to ``batch_size`` and masked, so one
    compiled shape serves the whole set.  ``eval_fn`` is a compiled
    ``make_eval_step`` (``placement.compile_eval``).  ``arrays`` is a split,
    ``{"x": (N, ...), "y": (N,)}``; returns ``{"loss": ..., "accuracy": ...}``
    (the eval step's metrics) as Python floats.  The split is checked first, once
    (``fundl.train.data_checks``): a label outside the model's classes or a non-finite
    input is an ``ExampleError``, not a mean over the rows that could be scored.

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
    enable_compilation_cache()
    placement = placement or single_device()
    n = len(arrays["y"])
    if n == 0:
        raise ValueError("evaluate: the evaluation set is empty")
    check_split(arrays, eval_fn, "evaluate: the evaluation data")  # before scoring; once per dataset
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

    ``history`` holds the records ``on_log`` received (dicts with ``step``,
    ``epoch``, ``split`` and the metrics); ``final_eval`` is the last
    ``"eval"`` record (``{}`` without ``eval_fn``); ``steps_per_call`` and
    ``unroll`` are what the fusion resolved to.
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


def fit(state, train_step: Callable, loader: Loader, *, num_steps: int, eval_fn: Callable | None = None,
        every: Every = Every(), checkpoints: Checkpointer | None = None, fusion: Fusion | str = "auto",
        nan_policy: str = "stop", placement=None, on_log: Callable | None = None,
        progress: bool = True) -> FitResult:
    """Train ``state`` with ``train_step`` until ``state.step == num_steps``.

    Args:
      state: a TrainState (possibly restored: training continues from its
        ``step``, and the loader is positioned at the matching batch).  It is
        copied on entry, so the caller's arrays stay valid although the
        compiled step donates its input buffers.
      train_step: the pure step from ``make_train_step``; compiled here.
      loader: a training Loader with ``drop_last=True``; its order depends
        only on (seed, epoch), so step ``t`` always sees the same batch.
      num_steps: the step to train up to (not a count from ``state.step``).
      eval_fn: ``eval_fn(state) -> dict`` of eval metrics (e.g. a closure over
        ``evaluate``), run every ``every.eval`` steps and at the end.  It gets
        the state as the placement holds it on the devices, not a host copy:
        the ordinary state with one device; under pmap the broadcast state
        (leading device axis), under sharding the replicated one.
        ``placement.eval_params(state)`` gives the ``(params, model_state)``
        that ``placement.compile_eval``'s function takes, with no copy;
        ``placement.get_state(state)`` gives a plain copy.  The state is valid
        only during the call: the next step donates its buffers.
      every: the intervals of logging, evaluation and checkpoints (:class:`Every`).
      checkpoints: a ``fundl.train.checkpoint.Checkpointer`` the caller made
        (directory, keep-K, async, the extras every manifest holds) and
        closes; ``fit`` saves through it every ``every.checkpoint`` steps and
        at the end, adding the loader position (``{"loader": ...}``) to each
        save's extras.  Every checkpoint ``fit`` reports is committed: it
        waits for the pending save at its end and on a stop signal; on an
        error it closes the Checkpointer (bounded in multi-process runs, where
        a dead peer may never finish its part).  None: no checkpoints.
      fusion: ``"auto"`` or a ``fundl.train.fusion.Fusion``: optimiser steps
        fused per dispatch (``lax.scan``; results equal single steps) and the
        scan's unroll, resolved once by ``fundl.train.fusion.resolve``.
      nan_policy: "stop" raises NonFiniteLossError naming the first step
        whose loss (or another metric) is NaN/Inf; metrics are checked when
        fetched (every ``every.log`` steps) and before every checkpoint, so
        no checkpoint holds a diverged state.  "skip": the optimiser must be
        wrapped in ``optax.apply_if_finite`` (the run layer does it),
        logged means use the finite steps and records carry
        ``skipped_updates``.  "ignore" carries on.
      placement: where the step runs (``fundl.train.placement``); one device by default.
      on_log: called with every record (train and eval) as it is logged;
        the run layer passes its run directory's ``log`` (metrics.jsonl).
      progress: a progress bar on a terminal (stderr).

    SIGTERM/SIGINT (see ``fundl.train.signals``) save a checkpoint at the next
    step boundary and raise :class:`~fundl.train.signals.TrainingInterrupted`.

    Before the first step the training data is checked once (``fundl.train.data_checks``):
    labels within the classes of ``train_step``'s model, finite inputs; else a
    ``fundl.data.checks.ExampleError`` naming the first bad example.

    Returns a :class:`FitResult`.  The guide docs/training.md shows ``fit`` with
    evaluation, logging and checkpoints.

    Examples:
        >>> from fundl.data import Loader
        >>> from fundl.train.loop import Every, fit
        >>> from fundl.train.optim import make_optimizer
        >>> from fundl.train.state import create_train_state
        >>> from fundl.train.step import make_train_step
        >>> model, opt = models.mlp([8], 3), make_optimizer("adam", 1e-2)
        >>> state = create_train_state(model, opt, jax.random.key(0), (1, 4))
        >>> rng = np.random.default_rng(0)
        >>> train = {"x": rng.normal(size=(256, 4)).astype(np.float32), "y": rng.integers(0, 3, 256).astype(np.int32)}
        >>> loader = Loader(train, batch_size=32, drop_last=True)
        >>> result = fit(state, make_train_step(model, opt), loader, num_steps=20, every=Every(log=10), progress=False)
        >>> int(result.state.step), [r["step"] for r in result.history]
        (20, [10, 20])
    """
    # ------------------------------------------------------------------ setup
    enable_compilation_cache()  # on by default (fundl.train.compile_cache)
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"fit: nan_policy must be 'stop', 'skip' or 'ignore', got {nan_policy!r}")
    if not isinstance(every, Every):
        raise TypeError(f"fit: every must be a fundl.train.loop.Every, got {every!r}")
    placement = placement or single_device()
    start = current_step(state)
    if start > num_steps:
        raise ValueError(f"fit: the state is at step {start}, past num_steps={num_steps}; a resumed run "
                         f"cannot end before its checkpoint: raise training.steps/epochs or use a new run dir")

    # ------------------------------------------------------------------- data
    first_batch = loader.batch(0, 0)  # shapes for the fusion rule
    for arrays in loader_splits(loader) or [first_batch]:  # labels and inputs, once per dataset
        check_split(arrays, train_step, "fit: the training data")
    loader.restore(loader.state_at_step(start))  # step t always sees the same batch

    # ---------------------------------------------------------------- compile
    steps_per_call, unroll = resolve(fusion, train_step, state, first_batch, axis_name=placement.axis_name,
                                     steps=num_steps - start)
    packed_step, names = _packed_metrics(train_step)
    compiled = {1: placement.compile_train(packed_step, 1)}
    if steps_per_call > 1:
        compiled[steps_per_call] = placement.compile_train(packed_step, steps_per_call, unroll)
    plan = _dispatch_plan(start, num_steps, steps_per_call, every)

    # ------------------------------------------------ events (at step boundaries)
    bar = _progress_bar(progress, num_steps, start)
    records = _Records(loader.steps_per_epoch, on_log, bar)
    metrics = _TrainMetrics(placement, nan_policy, names)
    saved = _Saved()

    def log_train(step, state) -> None:
        """Log the train metrics averaged since the last log (checked as they are fetched)."""
        means = metrics.means(loader.batch_size, saved.path)
        if means is None:
            return
        if nan_policy == "skip":
            skipped = skipped_updates(placement.get_state(state.opt_state))  # a few counters
            if skipped is not None:
                means["skipped_updates"] = skipped
        records.send(step, "train", means)

    def save(step, state) -> None:
        """Checkpoint ``state`` at ``step`` (once a step), never a diverged state."""
        if checkpoints is None or saved.step == step:
            return
        metrics.fetch(saved.path)  # a non-finite loss since the last log raises here, before the save
        if nan_policy == "stop" and not bool(_all_finite(state)):  # on the devices, as placed
            raise _non_finite_error("parameters or optimiser state", None, step, "params", saved.path,
                                    "the training loss was still finite")
        # Every process passes the global state (each writes its shards); this returns once the
        # device buffers are copied, and waits for the previous save's commit first.
        saved.path = checkpoints.save(placement.saveable(state), step=step,
                                      extras={"loader": loader.state_at_step(step)})
        saved.step = step

    # --------------------------------------------------------------- the loop
    batches = loader.stream_groups(plan)  # the K batches of a fused call gathered at once
    state = placement.put_state(state)  # a copy: the caller's arrays survive donation
    step, dispatches, compile_seconds, uncompiled = start, 0, 0.0, set(compiled.values())
    t0 = time.perf_counter()
    try:
        with StopSignals() as stop:
            for n in plan:
                fn, before = compiled[n], step
                batch = placement.put_batch(next(batches), stacked=n > 1)
                t_call = time.perf_counter()
                state, step_metrics = fn(state, batch)
                if fn in uncompiled:  # the first call traces and compiles (later ones only dispatch)
                    compile_seconds += time.perf_counter() - t_call
                    uncompiled.discard(fn)
                metrics.add(step_metrics, n, before)
                step, dispatches = step + n, dispatches + 1
                if placement.sync_every and dispatches % placement.sync_every == 0:
                    jax.block_until_ready(step_metrics)
                if bar is not None:
                    bar.update(n)

                last = step == num_steps
                if _due(every.log, step, last):
                    log_train(step, state)
                if eval_fn is not None and _due(every.eval, step, last):
                    records.send(step, "eval", eval_fn(state))  # on the devices as it is: no host copy
                if _due(every.checkpoint, step, last):
                    save(step, state)
                if not last and stop.should_stop(dispatches):  # a stop signal: save this step, then stop
                    log_train(step, state)
                    save(step, state)
                    if checkpoints is not None:
                        checkpoints.wait()  # the checkpoint the exception names is committed
                    raise TrainingInterrupted(stop.received, step, saved.path,
                                              "resume from this checkpoint" if saved.path else "")
            if eval_fn is not None and start == num_steps:
                records.send(step, "eval", eval_fn(state))  # resumed a finished run: report its evaluation
        jax.block_until_ready(state)
        if checkpoints is not None:
            checkpoints.wait()  # the last checkpoint committed (or its error raised)
    except BaseException as e:
        if checkpoints is not None:  # errors, too, leave no save half done
            _close_after_error(checkpoints, e)
        raise
    finally:
        batches.close()
        if bar is not None:
            bar.close()

    # ----------------------------------------------------------------- finish
    seconds = time.perf_counter() - t0
    final_state = placement.get_state(state)
    final_eval = next((r for r in reversed(records.history) if r["split"] == "eval"), {})
    skipped = skipped_updates(final_state.opt_state) if hasattr(final_state, "opt_state") else None
    return FitResult(final_state, records.history, final_eval, seconds,
                     (num_steps - start) * loader.batch_size / seconds if seconds > 0 else 0.0, skipped,
                     steps_per_call, unroll, compile_seconds)


# ------------------------------------------------------------------ fit's helpers, one job each
def _due(interval: int, step: int, last: bool) -> bool:
    """An event every ``interval`` steps (0: never) falls at ``step``; every event falls at the last step."""
    return last or bool(interval and step % interval == 0)


def _dispatch_plan(start: int, num_steps: int, steps_per_call: int, every: Every) -> list[int]:
    """Optimiser steps per dispatch from ``start`` to ``num_steps``: K where K fit before the next
    event (log, eval, checkpoint: fused calls end there), else single steps."""
    intervals = [i for i in (every.log, every.eval, every.checkpoint) if i]
    plan, s = [], start
    while s < num_steps:
        next_event = min([num_steps] + [(s // i + 1) * i for i in intervals])
        n = steps_per_call if next_event - s >= steps_per_call else 1
        plan.append(n)
        s += n
    return plan


def _progress_bar(enabled, total, initial):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)


def _packed_metrics(train_step):
    """The step with its metrics packed into one float32 array (metrics on the last axis), and
    their names.

    Host time to fetch metrics grows with the number of arrays (docs/benchmarks.md, "Host work
    per step"), so the usual loss + accuracy come back as one.  The names are filled in when the
    step is first traced; metrics of different shapes are left as they are (``names`` stays
    empty).  An ensemble's metrics have a member axis: shape (members,) each.
    """
    names: list[str] = []

    def step(state, batch):
        state, metrics = train_step(state, batch)
        if len({jnp.shape(v) for v in metrics.values()}) != 1:
            return state, metrics
        names[:] = sorted(metrics)
        return state, jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in names], axis=-1)

    return step, names


class _Records:
    """Builds and sends every record ``fit`` logs, in one place: history, progress bar, ``on_log``."""

    def __init__(self, steps_per_epoch: int, on_log: Callable | None, bar):
        self.steps_per_epoch, self.on_log, self.bar = steps_per_epoch, on_log, bar
        self.history: list[dict] = []

    def send(self, step: int, split: str, values: dict) -> None:
        record = {"step": step, "epoch": (step - 1) // self.steps_per_epoch if step else 0, "split": split, **values}
        self.history.append(record)
        if self.bar is not None and split == "train":
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values.get('accuracy', float('nan')):.3f}",
                                 ex_s=f"{values['examples_per_second']:.0f}")
        if self.on_log is not None:
            self.on_log(record)


@dataclass
class _Saved:
    """The newest checkpoint one ``fit`` call wrote: its path and step (None before the first)."""

    path: Path | None = None
    step: int | None = None


_PENDING_SAVE_ON_ERROR_S = 10.0  # multi-process runs: how long an error waits for a pending checkpoint


def _close_after_error(checkpoints: Checkpointer, error: BaseException) -> None:
    """After ``error``: finish the pending save, its own failure noted on ``error``.  Bounded with
    several processes, where a dead peer may never finish its part; ``close`` rather than ``wait``,
    so that a save abandoned at the bound cannot hang the caller's own ``close``."""
    pending = checkpoints.pending
    try:
        checkpoints.close(None if jax.process_count() == 1 else _PENDING_SAVE_ON_ERROR_S)
    except BaseException as late:  # noqa: BLE001 - reported on the error on its way out
        if late is not error:
            error.add_note(f"(the pending checkpoint {pending} failed too: {late})")


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
