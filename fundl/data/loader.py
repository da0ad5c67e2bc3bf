"""A deterministic, resumable batch loader over in-memory NumPy arrays.

Determinism: the order of epoch ``e`` is ``default_rng([seed, e]).permutation(n)``,
a pure function of ``(seed, e)``, so batch ``k`` of epoch ``e`` is the same in
every run, on every host, after any restart. The loader's only state is its
position ``(epoch, index)`` — the next batch to hand out — which
:meth:`Loader.state` returns as a plain dict for a checkpoint and
:meth:`Loader.restore` puts back.

Multi-host: ``batch_size`` is the *global* batch; process ``p`` of ``P`` gets the
contiguous slice ``[p*B/P, (p+1)*B/P)`` of every global batch. For ``pmap``,
``num_devices=D`` reshapes each local batch to ``(D, B/(P*D), ...)``.

Prefetch: a daemon thread fills a bounded queue with the next batches
(optionally already on device via ``device_put``); closing the iterator, the
loader, or leaving a ``with`` block stops and joins the thread.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import weakref
from typing import Any, Callable, Iterator, Mapping

import numpy as np

Batch = dict[str, Any]
_END = object()


class Loader:
    """Batches of ``arrays`` (a dict of equal-length arrays); each batch is a dict with the same keys.

    Examples:
        >>> from fundl.data import Loader
        >>> x, y = np.arange(10, dtype=np.float32)[:, None], np.arange(10) % 2
        >>> loader = Loader({"x": x, "y": y}, batch_size=4, seed=0, drop_last=True)
        >>> loader.steps_per_epoch, loader.batch(0, 0)["x"].shape     # batch 0 of epoch 0
        (2, (4, 1))
        >>> batches = iter(loader)                # the rest of the current epoch
        >>> first = next(batches)
        >>> ckpt = loader.state()                 # a plain dict, for a checkpoint
        >>> ckpt
        {'epoch': 0, 'index': 1, 'seed': 0, 'batch_size': 4, 'num_examples': 10}
        >>> again = Loader({"x": x, "y": y}, batch_size=4, seed=0, drop_last=True).restore(ckpt)
        >>> bool((next(iter(again))["x"] == next(batches)["x"]).all())     # continues exactly there
        True

    Args:
      arrays: name -> array, all with the same leading (example) dimension.
      batch_size: the global batch size, across all processes.
      shuffle: shuffle each epoch by ``(seed, epoch)``; else keep the array order.
      seed: non-negative int.
      drop_last: drop the final partial batch of each epoch (use for training:
        a constant shape compiles once); keep it for evaluation.
      process_index: this process's index, in ``[0, process_count)``.
      process_count: the processes sharing every global batch; each loads its slice.
      num_devices: if set, reshape local batches to ``(num_devices, B_local/num_devices, ...)``.
      prefetch: batches prepared ahead by a background thread; 0 disables the thread.
      device_put: ``None`` (batches stay NumPy), ``True`` (``jax.device_put`` to the
        default device), a ``jax.sharding.Sharding`` or device, or any callable
        ``batch -> batch``. Runs in the prefetch thread when prefetch > 0.
    """

    def __init__(self, arrays: Mapping[str, Any], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, process_index: int = 0, process_count: int = 1,
                 num_devices: int | None = None, prefetch: int = 2,
                 device_put: Any = None):
        self.arrays = _check_arrays(arrays)
        self.num_examples = len(next(iter(self.arrays.values())))
        self.batch_size = positive_int("batch_size", batch_size)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.seed = _nonnegative_int("seed", seed)
        self.process_count = positive_int("process_count", process_count)
        self.process_index = _nonnegative_int("process_index", process_index)
        if self.process_index >= self.process_count:
            raise ValueError(f"Loader: expected 0 <= process_index < process_count={self.process_count}, got {process_index}")
        self.num_devices = None if num_devices is None else positive_int("num_devices", num_devices)
        self.prefetch = _nonnegative_int("prefetch", prefetch)
        self._put = _make_put(device_put)
        n, b = self.num_examples, self.batch_size
        if drop_last and b > n:
            raise ValueError(
                f"Loader: batch_size={b} > {n} examples with drop_last=True would yield no batches; "
                f"use a batch_size <= {n} or drop_last=False"
            )
        self.steps_per_epoch = n // b if drop_last else math.ceil(n / b)
        sizes = {b} | ({n % b} if n % b and not drop_last else set())
        for size in sorted(sizes, reverse=True):
            self._split_size(size)  # fail now, not at the last batch of epoch 1
        self._epoch, self._index = 0, 0
        self._perm: tuple[int, np.ndarray] | None = None
        self._live: weakref.WeakSet = weakref.WeakSet()

    # ---------------------------------------------------------------- order
    def order(self, epoch: int) -> np.ndarray:
        """Global example indices of ``epoch`` in delivery order: a pure function of (seed, epoch)."""
        epoch = _nonnegative_int("epoch", epoch)
        cached = self._perm
        if cached is not None and cached[0] == epoch:
            return cached[1]
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        else:
            perm = np.arange(self.num_examples)
        self._perm = (epoch, perm)
        return perm

    def batch(self, epoch: int, index: int) -> Batch:
        """Batch ``index`` of ``epoch`` for this process (sliced and reshaped), as NumPy arrays."""
        out = {k: np.take(a, self._ids(epoch, index), axis=0) for k, a in self.arrays.items()}
        return self._shard(out, ())

    def batches(self, positions) -> Batch:
        """The batches at ``positions`` (``(epoch, index)`` pairs) stacked on a new leading axis of
        ``len(positions)``: equal to stacking :meth:`batch` results, gathered in one ``np.take`` per
        array (fused steps take K batches per dispatch; no second copy to stack them)."""
        ids = np.concatenate([self._ids(e, i) for e, i in positions])
        out = {k: np.take(a, ids, axis=0) for k, a in self.arrays.items()}
        k = len(positions)
        return self._shard({n: a.reshape((k, a.shape[0] // k) + a.shape[1:]) for n, a in out.items()}, (k,))

    def _ids(self, epoch: int, index: int) -> np.ndarray:
        """Example indices of batch ``index`` of ``epoch`` for this process."""
        if not 0 <= index < self.steps_per_epoch:
            raise IndexError(f"Loader: expected batch index in [0, {self.steps_per_epoch}), got {index}")
        ids = self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        per = self._split_size(len(ids))
        return ids[self.process_index * per:(self.process_index + 1) * per]

    def _shard(self, out: Batch, lead: tuple) -> Batch:
        """With ``num_devices``: (*lead, B, ...) -> (*lead, D, B/D, ...)."""
        if self.num_devices is None:
            return out
        d, n = self.num_devices, len(lead)
        return {k: a.reshape(lead + (d, a.shape[n] // d) + a.shape[n + 1:]) for k, a in out.items()}

    def _split_size(self, global_size: int) -> int:
        """Per-process size of a global batch of ``global_size``; errors explain indivisible sizes."""
        p, d = self.process_count, self.num_devices or 1
        if global_size % p or (global_size // p) % d:
            last = " (the final partial batch; pass drop_last=True to drop it)" if global_size != self.batch_size else ""
            raise ValueError(
                f"Loader: a batch of {global_size}{last} cannot be split into {p} process slices of "
                f"{d} device shards each: expected a multiple of {p * d}, got {global_size}"
            )
        return global_size // p

    # ------------------------------------------------------------- position
    def state(self) -> dict[str, int]:
        """Position of the next batch, ``{"epoch", "index"}``, plus ``seed``/``batch_size``/``num_examples`` to check on restore."""
        return {"epoch": self._epoch, "index": self._index, "seed": self.seed,
                "batch_size": self.batch_size, "num_examples": self.num_examples}

    def restore(self, state: Mapping[str, int]) -> "Loader":
        """Continue from ``state`` (from :meth:`state`); returns ``self``. Mismatched settings are errors."""
        for key in ("seed", "batch_size", "num_examples"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"Loader.restore: the saved position was for {key}={int(state[key])}, this loader has "
                    f"{key}={getattr(self, key)}; batches would differ from the saved run"
                )
        missing = {"epoch", "index"} - set(state)
        if missing:
            raise KeyError(f"Loader.restore: expected keys 'epoch' and 'index', missing {sorted(missing)}")
        epoch, index = _nonnegative_int("epoch", state["epoch"]), _nonnegative_int("index", state["index"])
        if index > self.steps_per_epoch:
            raise ValueError(f"Loader.restore: expected index <= steps_per_epoch={self.steps_per_epoch}, got {index}")
        self._epoch, self._index = (epoch + 1, 0) if index == self.steps_per_epoch else (epoch, index)
        return self

    def state_at_step(self, step: int) -> dict[str, int]:
        """The position after ``step`` batches from the start: for loops that count global steps."""
        epoch, index = divmod(_nonnegative_int("step", step), self.steps_per_epoch)
        return {**self.state(), "epoch": epoch, "index": index}

    # ------------------------------------------------------------ iteration
    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self, epoch: int, start: int = 0) -> "BatchIterator":
        """Batches ``start, start+1, ...`` of ``epoch`` (a closeable iterator); moves the position as they are taken."""
        epoch, start = _nonnegative_int("epoch", epoch), _nonnegative_int("start", start)
        if start > self.steps_per_epoch:
            raise ValueError(f"Loader.epoch: expected start <= {self.steps_per_epoch}, got {start}")
        return self._iterate((epoch, i) for i in range(start, self.steps_per_epoch))

    def __iter__(self) -> "BatchIterator":
        """The rest of the current epoch, from the current position."""
        return self.epoch(self._epoch, self._index)

    def stream(self, num_batches: int | None = None) -> "BatchIterator":
        """Batches from the current position across epoch boundaries; endless unless ``num_batches``."""
        pos = self._positions(self._epoch, self._index)  # the position now, not when first pulled
        return self._iterate(pos if num_batches is None else itertools.islice(pos, num_batches))

    def stream_groups(self, sizes) -> "BatchIterator":
        """Like :meth:`stream`, in groups: for each k of ``sizes``, the next k batches — one batch
        as it is for k = 1, :meth:`batches` stacked on a leading axis of k for k > 1."""
        pos = self._positions(self._epoch, self._index)
        return self._iterate([next(pos) for _ in range(k)] for k in sizes)

    def _positions(self, e: int, i: int):
        while True:
            for j in range(i, self.steps_per_epoch):
                yield e, j
            e, i = e + 1, 0

    def close(self) -> None:
        """Stop every live iterator's prefetch thread."""
        for it in list(self._live):
            it.close()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _iterate(self, positions: Iterator[tuple[int, int]]) -> "BatchIterator":
        it = BatchIterator(self, positions)
        self._live.add(it)
        return it

    def _produce(self, pos) -> Batch:
        """The batch at ``pos``, or for a list of positions (a group) one batch if it has one, else stacked."""
        if isinstance(pos, list):
            batch = self.batch(*pos[0]) if len(pos) == 1 else self.batches(pos)
        else:
            batch = self.batch(*pos)
        return self._put(batch) if self._put is not None else batch

    def _taken(self, pos) -> None:
        for epoch, index in pos if isinstance(pos, list) else [pos]:
            self._epoch, self._index = (epoch + 1, 0) if index + 1 == self.steps_per_epoch else (epoch, index + 1)


class BatchIterator:
    """Iterator over loader batches, with an optional prefetch thread; ``close()`` or ``with`` stops it."""

    def __init__(self, loader: Loader, positions: Iterator[tuple[int, int]]):
        self._loader, self._positions = loader, positions
        self._thread: threading.Thread | None = None
        self._closed = False
        if loader.prefetch > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=loader.prefetch)
            self._stop = threading.Event()
            # The thread must not reference this iterator, so an abandoned iterator
            # is garbage-collected and its __del__ stops the thread.
            self._thread = threading.Thread(
                target=_fill, args=(self._queue, self._stop, positions, loader._produce),
                name="fundl-prefetch", daemon=True)
            self._thread.start()

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise StopIteration
        if self._thread is None:
            try:
                pos = next(self._positions)
            except StopIteration:
                self.close()
                raise
            batch = self._loader._produce(pos)
        else:
            item = self._queue.get()
            if item is _END or isinstance(item, BaseException):
                self.close()
                if item is _END:
                    raise StopIteration
                raise item
            pos, batch = item
        self._loader._taken(pos)
        return batch

    def close(self) -> None:
        """Stop and join the prefetch thread; later ``next`` calls raise StopIteration."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._stop.set()
            while True:  # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join()

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _fill(q: queue.Queue, stop: threading.Event, positions, produce) -> None:
    """Prefetch thread body: put (position, batch) items, then _END or the exception raised."""

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    try:
        for pos in positions:
            if not offer((pos, produce(pos))):
                return
        offer(_END)
    except BaseException as e:  # hand the error to the consumer, who re-raises it
        offer(e)


def _check_arrays(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(arrays, Mapping) or not arrays:
        raise TypeError(f"Loader: expected a non-empty dict of arrays such as {{'x': x, 'y': y}}, got {type(arrays).__name__}")
    out = {str(k): np.asarray(v) for k, v in arrays.items()}
    lengths = {k: (len(v) if v.ndim else None) for k, v in out.items()}
    if None in lengths.values() or len(set(lengths.values())) != 1:
        raise ValueError(f"Loader: expected arrays with the same leading (example) dimension, got lengths {lengths}")
    if next(iter(lengths.values())) == 0:
        raise ValueError("Loader: expected at least one example, got arrays of length 0")
    return out


def _make_put(device_put: Any) -> Callable[[Batch], Batch] | None:
    if device_put is None or device_put is False:
        return None
    if callable(device_put):
        return device_put
    import jax  # lazy: the loader itself needs only NumPy

    if device_put is True:
        return jax.device_put
    return lambda batch: jax.device_put(batch, device_put)


def positive_int(name: str, value) -> int:
    """``value`` as an int, or a ValueError naming the Loader argument ``name`` unless it is a
    positive integer (bools refused); loaders built on :class:`Loader` check theirs with it."""
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"Loader: expected {name} to be a positive int, got {value!r}")
    return int(value)


def _nonnegative_int(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"Loader: expected {name} to be a non-negative int, got {value!r}")
    return int(value)
