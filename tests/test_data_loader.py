"""Loader: order by (seed, epoch), exact resume, process slices, device axis, prefetch without leaks."""

import gc
import threading
import time

import numpy as np
import pytest

from fundl.data import Loader


def _arrays(n=103):
    return {"x": np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3), "y": np.arange(n, dtype=np.int32)}


def _ids(batches):
    return [b["y"].tolist() for b in batches]


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "fundl-prefetch"]


@pytest.fixture(autouse=True)
def no_thread_leaks():
    yield
    for _ in range(100):
        if not _prefetch_threads():
            break
        time.sleep(0.01)
    assert _prefetch_threads() == []


def test_batches_are_dicts_of_matching_rows():
    loader = Loader(_arrays(), 10, seed=0, prefetch=0)
    for b in loader.epoch(0):
        assert set(b) == {"x", "y"} and isinstance(b["x"], np.ndarray)
        np.testing.assert_array_equal(b["x"][:, 0, 0], b["y"] * 6)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_order_is_a_pure_function_of_seed_and_epoch(prefetch):
    a = Loader(_arrays(), 10, seed=3, prefetch=prefetch)
    b = Loader(_arrays(), 10, seed=3, prefetch=prefetch)
    e1_first = _ids(a.epoch(1))
    _ids(a.epoch(0)), _ids(a.epoch(5))  # other epochs in between change nothing
    assert _ids(a.epoch(1)) == e1_first == _ids(b.epoch(1))
    assert _ids(b.epoch(2)) != e1_first and _ids(Loader(_arrays(), 10, seed=4).epoch(1)) != e1_first
    expected = np.random.default_rng([3, 1]).permutation(103)
    assert sum(e1_first, []) == expected.tolist()
    assert a.batch(1, 4)["y"].tolist() == e1_first[4]


def test_every_example_once_per_epoch_and_last_batch():
    keep = Loader(_arrays(), 10, seed=0, drop_last=False, prefetch=0)
    assert keep.steps_per_epoch == len(keep) == 11
    batches = _ids(keep.epoch(0))
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert sorted(sum(batches, [])) == list(range(103))
    drop = Loader(_arrays(), 10, seed=0, drop_last=True, prefetch=0)
    assert drop.steps_per_epoch == 10 and _ids(drop.epoch(0)) == batches[:10]
    plain = Loader(_arrays(), 10, shuffle=False, prefetch=0)
    assert sum(_ids(plain.epoch(7)), []) == list(range(103))


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_resume_mid_epoch_yields_exactly_the_rest(prefetch):
    full = _ids(Loader(_arrays(), 8, seed=1, drop_last=True, prefetch=0).epoch(2))
    loader = Loader(_arrays(), 8, seed=1, drop_last=True, prefetch=prefetch).restore({"epoch": 2, "index": 0})
    it = iter(loader)
    taken = [next(it)["y"].tolist() for _ in range(5)]
    state = loader.state()  # counts batches handed out, not the ones prefetched
    it.close()
    assert state["epoch"] == 2 and state["index"] == 5 and all(type(v) is int for v in state.values())
    resumed = Loader(_arrays(), 8, seed=1, drop_last=True, prefetch=prefetch).restore(state)
    rest = _ids(resumed)
    assert taken + rest == full
    assert _ids(Loader(_arrays(), 8, seed=1, drop_last=True).epoch(2, start=5)) == full[5:]
    assert resumed.state()["epoch"] == 3 and resumed.state()["index"] == 0


def test_stream_crosses_epochs_and_resumes():
    ref = Loader(_arrays(), 25, seed=2, drop_last=True, prefetch=0)
    expected = _ids(ref.epoch(0)) + _ids(ref.epoch(1)) + _ids(ref.epoch(2))
    loader = Loader(_arrays(), 25, seed=2, drop_last=True)
    first = _ids(loader.stream(6))
    assert first == expected[:6] and loader.state()["epoch"] == 1 and loader.state()["index"] == 2
    again = Loader(_arrays(), 25, seed=2, drop_last=True).restore(loader.state_at_step(6))
    assert _ids(again.stream(6)) == expected[6:]


def test_restore_checks():
    loader = Loader(_arrays(), 10, seed=0, drop_last=True)
    state = loader.state()
    with pytest.raises(ValueError, match="saved position was for seed=0, this loader has seed=1"):
        Loader(_arrays(), 10, seed=1).restore(state)
    with pytest.raises(ValueError, match="batch_size=10, this loader has batch_size=5"):
        Loader(_arrays(), 5, seed=0).restore(state)
    with pytest.raises(ValueError, match="expected index <= steps_per_epoch=10, got 11"):
        loader.restore({"epoch": 0, "index": 11})
    with pytest.raises(KeyError, match="missing \\['index'\\]"):
        loader.restore({"epoch": 0})
    assert loader.restore({"epoch": 4, "index": 10}).state()["epoch"] == 5  # end of epoch 4 = start of 5


@pytest.mark.parametrize("count", [2, 4])
def test_process_slices_partition_each_global_batch(count):
    whole = Loader(_arrays(), 16, seed=5, drop_last=True, prefetch=0)
    parts = [Loader(_arrays(), 16, seed=5, drop_last=True, process_index=p, process_count=count, prefetch=0)
             for p in range(count)]
    for k, global_batch in enumerate(whole.epoch(3)):
        slices = [part.batch(3, k) for part in parts]
        assert all(len(s["y"]) == 16 // count for s in slices)
        for key in ("x", "y"):
            np.testing.assert_array_equal(np.concatenate([s[key] for s in slices]), global_batch[key])


def test_device_axis():
    loader = Loader(_arrays(), 16, seed=0, drop_last=True, num_devices=4, process_index=1, process_count=2, prefetch=0)
    b = loader.batch(0, 0)
    assert b["x"].shape == (4, 2, 2, 3) and b["y"].shape == (4, 2)
    flat = Loader(_arrays(), 16, seed=0, drop_last=True).batch(0, 0)
    np.testing.assert_array_equal(b["y"].reshape(-1), flat["y"][8:])


def test_construction_errors():
    with pytest.raises(ValueError, match=r"same leading .* lengths \{'x': 103, 'y': 5\}"):
        Loader({"x": _arrays()["x"], "y": np.zeros(5)}, 10)
    with pytest.raises(ValueError, match="batch_size=200 > 103 examples with drop_last=True"):
        Loader(_arrays(), 200, drop_last=True)
    assert Loader(_arrays(), 200, drop_last=False, prefetch=0).steps_per_epoch == 1
    with pytest.raises(ValueError, match="expected a multiple of 12, got 16"):
        Loader(_arrays(), 16, drop_last=True, num_devices=4, process_count=3)
    with pytest.raises(ValueError, match="batch of 3 \\(the final partial batch; pass drop_last=True"):
        Loader(_arrays(), 10, drop_last=False, num_devices=2)
    with pytest.raises(ValueError, match="process_index < process_count=2"):
        Loader(_arrays(), 10, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="batch_size to be a positive int, got 0"):
        Loader(_arrays(), 0)
    with pytest.raises(ValueError, match="seed to be a non-negative int"):
        Loader(_arrays(), 10, seed=-1)
    with pytest.raises(TypeError, match="non-empty dict"):
        Loader([1, 2, 3], 1)
    with pytest.raises(IndexError, match=r"batch index in \[0, 11\), got 11"):
        Loader(_arrays(), 10).batch(0, 11)


def test_prefetch_yields_identical_batches_and_closes():
    a = list(Loader(_arrays(), 7, seed=9, prefetch=0).epoch(1))
    loader = Loader(_arrays(), 7, seed=9, prefetch=2)
    with loader.epoch(1) as it:
        assert len(_prefetch_threads()) == 1
        b = list(it)
    assert len(a) == len(b) == 15
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert _prefetch_threads() == []  # finished iteration joins the thread


def test_abandoned_and_closed_iterators_stop_their_threads():
    loader = Loader(_arrays(), 1, seed=0, prefetch=2)
    it = loader.epoch(0)
    next(it)
    time.sleep(0.05)  # let the producer block on the full queue
    it.close()
    assert _prefetch_threads() == []
    with pytest.raises(StopIteration):
        next(it)
    it = iter(loader)
    next(it)
    del it
    gc.collect()  # an abandoned iterator is collected and stops its thread
    assert _prefetch_threads() == []
    its = [loader.epoch(e) for e in range(3)]
    [next(i) for i in its]
    loader.close()  # closes every live iterator
    assert _prefetch_threads() == []


@pytest.mark.parametrize("prefetch", [0, 2])
def test_device_put_callable_and_errors_propagate(prefetch):
    seen = []

    def put(batch):
        seen.append(threading.current_thread().name)
        if len(seen) == 3:
            raise RuntimeError("device full")
        return {k: v * 2 for k, v in batch.items()}

    loader = Loader(_arrays(), 10, seed=0, prefetch=prefetch, device_put=put)
    it = loader.epoch(0)
    assert next(it)["y"].tolist() == (Loader(_arrays(), 10, seed=0).batch(0, 0)["y"] * 2).tolist()
    next(it)
    with pytest.raises(RuntimeError, match="device full"):
        next(it)
    assert loader.state()["index"] == 2
    assert (seen[0] == "fundl-prefetch") == (prefetch > 0)


def test_jax_device_put():
    jax = pytest.importorskip("jax")
    loader = Loader(_arrays(), 8, seed=0, drop_last=True, prefetch=2, device_put=True)
    with loader.epoch(0) as it:
        b = next(it)
    assert isinstance(b["x"], jax.Array) and b["x"].shape == (8, 2, 3)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    b = next(iter(Loader(_arrays(), 8, seed=0, prefetch=0, device_put=sharding)))
    assert isinstance(b["y"], jax.Array) and b["y"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(b["y"]), Loader(_arrays(), 8, seed=0).batch(0, 0)["y"])


def test_stream_groups_equal_single_batches_stacked_and_move_the_position_alike():
    """Fused steps take K batches gathered at once: the same batches, the same position after."""
    x = np.arange(50 * 3, dtype=np.float32).reshape(50, 3)
    y = np.arange(50)
    single = Loader({"x": x, "y": y}, 8, seed=3, drop_last=True, prefetch=0)
    grouped = Loader({"x": x, "y": y}, 8, seed=3, drop_last=True, prefetch=2)
    want = list(single.stream(13))
    got = []
    for group, k in zip(grouped.stream_groups([1, 4, 4, 1, 3]), [1, 4, 4, 1, 3]):
        got += [group] if k == 1 else [{n: v[i] for n, v in group.items()} for i in range(k)]
    assert len(got) == 13
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["y"], b["y"])
    assert single.state() == grouped.state() == {**single.state(), "epoch": 2, "index": 1}
    stacked = Loader({"x": x, "y": y}, 8, seed=3, drop_last=True, num_devices=2).batches([(0, 0), (0, 1)])
    assert stacked["x"].shape == (2, 2, 4, 3)  # (K, devices, per-device batch, ...)
