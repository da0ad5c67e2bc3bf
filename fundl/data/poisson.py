"""Poisson-sampled batches: the sampling DP-SGD's privacy analysis assumes, in fixed shapes.

At every step each of the N training examples is included independently with
probability ``q = batch_size / N``, so a batch holds Binomial(N, q) examples,
``batch_size`` on average.  The privacy accountant (``fundl.transforms.dp``)
composes exactly these Poisson-subsampled steps; shuffled fixed-size batches
would need a different (and weaker) analysis.

Fixed shapes: a batch is padded to ``max_batch_size`` with a ``mask`` (1.0
for a sampled example, 0.0 for padding; padding rows repeat example 0 and
must be masked out by the step, as ``make_dp_train_step`` does).
``max_batch_size`` is by default the smallest size that a batch exceeds with
probability at most ``overflow_probability`` (1e-6 per step), rounded up to
a multiple of processes x devices.  A batch larger than that is *not*
truncated (truncation would change the sampling, and the analysis): that
batch is padded to its own size instead, which gives the compiled step a new
shape (one recompilation, with a warning).  The privacy guarantee is
therefore exactly that of Poisson sampling.

Determinism: the examples of step ``t`` are a pure function of ``(seed, t)``
(``default_rng([seed, 0x706f6973, t])``, one uniform draw per example), so
a restart at any step sees the same batches.  The position interface is
:class:`fundl.data.Loader`'s: ``(epoch, index)`` with ``steps_per_epoch =
N // batch_size`` steps per "epoch" (an epoch is only a unit of steps here:
examples are not visited once each), ``state``/``restore``/``state_at_step``,
``batch``/``batches``/``stream``/``stream_groups``, per-process slices and a
device axis, prefetching -- so ``fundl.train.loop.fit`` drives it unchanged.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

import numpy as np

from fundl.data.loader import Batch, Loader, positive_int

_STREAM = 0x706F6973  # "pois": keeps these draws apart from Loader's ([seed, epoch]) permutations


def binomial_quantile(n: int, q: float, tail: float) -> int:
    """The smallest m with P(Binomial(n, q) > m) <= tail."""
    from scipy.stats import binom

    m = int(binom.isf(tail, n, q))
    while m < n and binom.sf(m, n, q) > tail:  # isf is approximate at the boundary
        m += 1
    return min(m, n)


class PoissonLoader(Loader):
    """Poisson-sampled, padded and masked batches of ``arrays``; ``batch_size`` is the *expected* size.

    Examples:
        >>> from fundl.data.poisson import PoissonLoader
        >>> x, y = np.zeros((1000, 3), np.float32), np.zeros(1000, np.int32)
        >>> loader = PoissonLoader({"x": x, "y": y}, batch_size=100, seed=0)
        >>> loader.sampling_rate, loader.max_batch_size     # 100 / len(x), the padded shape
        (0.1, 148)
        >>> batch = loader.batch(0, 0)                       # max_batch_size rows, "mask" marks the real ones
        >>> sorted(batch), batch["x"].shape
        (['mask', 'x', 'y'], (148, 3))

    ``arrays``, ``seed``, ``process_index``, ``process_count``, ``num_devices``, ``prefetch``
    and ``device_put`` are as in ``Loader`` (``batch_size`` must split over processes x devices
    as there).

    Args:
      batch_size: the expected batch size; the sampling rate is ``batch_size / num_examples``.
      max_batch_size: the padded shape (None: chosen from ``overflow_probability``).
      overflow_probability: per-step probability that a batch exceeds the default padded shape.
      multiple_of: padded sizes are multiples of this (and of processes x devices), e.g. the global
        device count when a placement splits each batch over devices.
    """

    def __init__(self, arrays: Mapping[str, Any], batch_size: int, *, seed: int = 0,
                 max_batch_size: int | None = None, overflow_probability: float = 1e-6, multiple_of: int = 1,
                 process_index: int = 0, process_count: int = 1, num_devices: int | None = None,
                 prefetch: int = 2, device_put: Any = None):
        if "mask" in arrays:
            raise ValueError("PoissonLoader: 'mask' is the name of the padding mask it adds; rename that array")
        super().__init__(arrays, batch_size, shuffle=True, seed=seed, drop_last=True,
                         process_index=process_index, process_count=process_count, num_devices=num_devices,
                         prefetch=prefetch, device_put=device_put)
        n = self.num_examples
        self.sampling_rate = self.batch_size / n
        multiple_of = positive_int("multiple_of", multiple_of)
        self.unit = math.lcm(self.process_count * (self.num_devices or 1), multiple_of)  # padded sizes: multiples
        if max_batch_size is None:
            if not 0 < overflow_probability < 1:
                raise ValueError(f"PoissonLoader: overflow_probability must be in (0, 1), got {overflow_probability}")
            max_batch_size = binomial_quantile(n, self.sampling_rate, overflow_probability)
        elif isinstance(max_batch_size, bool) or int(max_batch_size) != max_batch_size or max_batch_size < 1:
            raise ValueError(f"PoissonLoader: max_batch_size must be a positive int, got {max_batch_size!r}")
        self.max_batch_size = self._round_up(max(int(max_batch_size), 1))
        self._warned = False

    def _round_up(self, size: int) -> int:
        return -(-size // self.unit) * self.unit

    # ------------------------------------------------------------- sampling
    def sample(self, step: int) -> np.ndarray:
        """Indices (ascending) of the examples in the batch of global step ``step``: each one
        independently with probability ``sampling_rate``; a pure function of ``(seed, step)``."""
        rng = np.random.default_rng([self.seed, _STREAM, int(step)])
        return np.flatnonzero(rng.random(self.num_examples) < self.sampling_rate)

    def order(self, epoch: int) -> np.ndarray:
        raise TypeError("PoissonLoader has no epoch order: each step samples its examples independently "
                        "(see PoissonLoader.sample)")

    def _step_of(self, epoch: int, index: int) -> int:
        if not 0 <= index < self.steps_per_epoch:
            raise IndexError(f"PoissonLoader: expected batch index in [0, {self.steps_per_epoch}), got {index}")
        return epoch * self.steps_per_epoch + index

    def _padded(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """Global ids and masks of the batches at ``positions``, padded to one size: (k, m) each."""
        samples = [self.sample(self._step_of(e, i)) for e, i in positions]
        size = max([self.max_batch_size] + [self._round_up(len(s)) for s in samples])
        if size > self.max_batch_size and not self._warned:
            self._warned = True
            big = max(len(s) for s in samples)
            warnings.warn(f"PoissonLoader: a batch sampled {big} examples, more than the padded size "
                          f"{self.max_batch_size} (expected {self.batch_size}); it is padded to {size} instead "
                          f"of being truncated (the privacy analysis assumes no truncation): the step "
                          f"recompiles for that shape", RuntimeWarning, stacklevel=3)
        ids = np.zeros((len(samples), size), np.int64)
        mask = np.zeros((len(samples), size), np.float32)
        for j, s in enumerate(samples):
            ids[j, :len(s)] = s
            mask[j, :len(s)] = 1.0
        per = size // self.process_count  # this process's contiguous slice of every global batch
        sl = slice(self.process_index * per, (self.process_index + 1) * per)
        return ids[:, sl], mask[:, sl]

    def batch(self, epoch: int, index: int) -> Batch:
        """Batch ``index`` of ``epoch`` (global step ``epoch * steps_per_epoch + index``) for this
        process: the arrays' rows and ``mask``, padded to ``max_batch_size`` (or more: see module)."""
        ids, mask = self._padded([(epoch, index)])
        out = {k: np.take(a, ids[0], axis=0) for k, a in self.arrays.items()}
        out["mask"] = mask[0]
        return self._shard(out, ())

    def batches(self, positions) -> Batch:
        """The batches at ``positions`` stacked on a new leading axis, all padded to one size."""
        ids, mask = self._padded(list(positions))
        k, m = ids.shape
        out = {n: np.take(a, ids.reshape(-1), axis=0).reshape((k, m) + a.shape[1:]) for n, a in self.arrays.items()}
        out["mask"] = mask
        return self._shard(out, (k,))

    def state(self) -> dict:
        return {**super().state(), "sampling": "poisson"}

    def __repr__(self) -> str:
        return (f"PoissonLoader({self.num_examples} examples, sampling rate {self.sampling_rate:.6g} "
                f"(expected batch {self.batch_size}), padded to {self.max_batch_size}, seed {self.seed})")

