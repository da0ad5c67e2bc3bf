"""The Poisson loader: each example in each step's batch independently with probability
batch_size / N, padded and masked to a fixed shape, never truncated, a pure function of
(seed, step), resumable and sliced per process like Loader."""

import numpy as np
import pytest
from scipy.stats import binom

from fundl.data.poisson import PoissonLoader, binomial_quantile

N = 200


def arrays(n=N):
    return {"x": np.arange(n * 3, dtype=np.float32).reshape(n, 3), "y": np.arange(n, dtype=np.int32)}


def test_batches_are_the_sampled_examples_padded_and_masked():
    loader = PoissonLoader(arrays(), 20, seed=1, prefetch=0)
    assert loader.sampling_rate == 0.1 and loader.steps_per_epoch == 10
    for epoch, index in [(0, 0), (0, 7), (3, 2)]:
        b = loader.batch(epoch, index)
        ids = loader.sample(epoch * 10 + index)
        k = len(ids)
        assert b["x"].shape == (loader.max_batch_size, 3) and b["mask"].shape == (loader.max_batch_size,)
        np.testing.assert_array_equal(b["mask"], np.r_[np.ones(k), np.zeros(loader.max_batch_size - k)])
        np.testing.assert_array_equal(b["y"][:k], ids)
        np.testing.assert_array_equal(b["x"][:k], arrays()["x"][ids])


def test_sampling_is_poisson_at_rate_q():
    """Over many steps: batch sizes are Binomial(N, q), every example is drawn at rate q, and
    draws of one example in different steps are independent of its other steps."""
    loader = PoissonLoader(arrays(), 20, seed=0, prefetch=0)
    steps = 3000
    inc = np.zeros((steps, N), bool)
    for t in range(steps):
        inc[t, loader.sample(t)] = True
    sizes = inc.sum(1)
    assert abs(sizes.mean() - 20) < 4 * np.sqrt(N * 0.1 * 0.9 / steps)
    assert sizes.var() == pytest.approx(N * 0.1 * 0.9, rel=0.15)
    rate = inc.mean(0)  # per example: Binomial(steps, q) / steps
    sd = np.sqrt(0.1 * 0.9 / steps)
    assert np.abs(rate - 0.1).max() < 5 * sd
    both = (inc[1:] & inc[:-1]).mean()  # drawn in two consecutive steps: q^2 if independent
    assert both == pytest.approx(0.01, rel=0.1)


def test_a_pure_function_of_seed_and_step_and_resumable():
    a = PoissonLoader(arrays(), 20, seed=5, prefetch=0)
    b = PoissonLoader(arrays(), 20, seed=5, prefetch=2)
    c = PoissonLoader(arrays(), 20, seed=6, prefetch=0)
    first = list(a.stream(25))
    again = list(b.restore(b.state_at_step(13)).stream(12))
    for x, y in zip(first[13:], again):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(c.batch(0, 0)["mask"], a.batch(0, 0)["mask"]) or \
        not np.array_equal(c.batch(0, 0)["y"], a.batch(0, 0)["y"])
    assert a.state()["sampling"] == "poisson"
    with pytest.raises(ValueError, match="seed"):
        c.restore(a.state())


def test_groups_equal_single_batches_stacked():
    loader = PoissonLoader(arrays(), 20, seed=3, prefetch=0)
    group = loader.batches([(0, 8), (0, 9), (1, 0)])
    for j, pos in enumerate([(0, 8), (0, 9), (1, 0)]):
        single = loader.batch(*pos)
        for k in single:
            np.testing.assert_array_equal(group[k][j], single[k])
    fused = list(PoissonLoader(arrays(), 20, seed=3, prefetch=0).stream_groups([2, 1]))
    assert fused[0]["x"].shape[:2] == (2, loader.max_batch_size)


def test_default_padded_size_and_overflow_is_never_truncated():
    loader = PoissonLoader(arrays(), 20, prefetch=0)
    m = loader.max_batch_size
    assert binom.sf(m, N, 0.1) <= 1e-6 < binom.sf(m - 1, N, 0.1)
    assert binomial_quantile(N, 0.1, 1e-6) == m
    small = PoissonLoader(arrays(), 20, seed=0, max_batch_size=5, prefetch=0)
    with pytest.warns(RuntimeWarning, match="padded to .* instead of being truncated"):
        b = small.batch(0, 0)
    k = len(small.sample(0))
    assert k > 5 and b["mask"].sum() == k and len(b["mask"]) == k
    group = small.batches([(0, 1), (0, 2)])  # one shape for a group: the larger one
    assert group["mask"].shape[1] == max(len(small.sample(1)), len(small.sample(2)))


def test_process_slices_and_device_axis():
    whole = PoissonLoader(arrays(), 20, seed=4, prefetch=0)
    parts = [PoissonLoader(arrays(), 20, seed=4, process_index=p, process_count=2, num_devices=2, prefetch=0)
             for p in range(2)]
    assert parts[0].max_batch_size % 4 == 0
    for pos in [(0, 0), (2, 5)]:
        got = [p.batch(*pos) for p in parts]
        assert got[0]["x"].shape == (2, parts[0].max_batch_size // 4, 3)
        mask = np.concatenate([g["mask"].reshape(-1) for g in got])
        ids = np.concatenate([g["y"].reshape(-1) for g in got])
        k = len(whole.sample(pos[0] * 10 + pos[1]))
        assert mask.sum() == k
        np.testing.assert_array_equal(ids[:k], whole.batch(*pos)["y"][:k])
    assert PoissonLoader(arrays(), 20, multiple_of=8, prefetch=0).max_batch_size % 8 == 0


def test_errors():
    with pytest.raises(ValueError, match="'mask'"):
        PoissonLoader({**arrays(), "mask": np.ones(N)}, 20)
    with pytest.raises(TypeError, match="no epoch order"):
        PoissonLoader(arrays(), 20).order(0)
    with pytest.raises(ValueError, match="batch_size"):
        PoissonLoader(arrays(), N + 1)
    with pytest.raises(IndexError):
        PoissonLoader(arrays(), 20).batch(0, 10)
