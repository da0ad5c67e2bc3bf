"""MNIST-1D: exactly the package's output, offline, no files written, caller's RNG state untouched."""

import os
import random

import numpy as np
import pytest

from fundl.data import load_dataset, load_mnist1d
from fundl.data import mnist1d as m1d


@pytest.fixture(autouse=True)
def offline_and_isolated(monkeypatch, tmp_path, no_network):
    """No network (any connect fails loudly), a throwaway working dir and cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FUNDL_CACHE_DIR", str(tmp_path / "cache"))


def _reference(**overrides):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.__dict__.update(overrides)
    return make_dataset(args)


@pytest.mark.slow
def test_paper_defaults_match_make_dataset_exactly_and_leave_rng_alone(tmp_path):
    random.seed(123)
    np.random.seed(456)
    py_before, np_before = random.getstate(), np.random.get_state()
    data = load_mnist1d()
    assert random.getstate() == py_before
    np_after = np.random.get_state()
    assert np_after[0] == np_before[0] and np.array_equal(np_after[1], np_before[1]) and np_after[2:] == np_before[2:]
    # nothing in the working dir but the cache the fixture points FUNDL_CACHE_DIR at
    assert os.listdir(tmp_path) == ["cache"] and len(list((tmp_path / "cache" / "mnist1d").glob("*.npz"))) == 1
    ref = _reference()
    assert data["x"].shape == (4000, 40) and data["x_test"].shape == (1000, 40)
    for k in ("x", "y", "x_test", "y_test", "t"):
        assert data[k].dtype == ref[k].dtype
        np.testing.assert_array_equal(data[k], ref[k])


def test_rng_restored_even_when_generation_fails(monkeypatch):
    random.seed(1)
    np.random.seed(1)
    expected = (random.random(), np.random.rand())
    random.seed(1)
    np.random.seed(1)
    with pytest.raises(ZeroDivisionError):
        with m1d.preserved_global_rng():
            random.seed(99)
            np.random.seed(99)
            raise ZeroDivisionError
    assert (random.random(), np.random.rand()) == expected


def test_shuffle_seq_and_custom_size_match_reference():
    data = load_mnist1d(num_samples=600, train_split=0.75, shuffle_seq=True, seed=7)
    ref = _reference(num_samples=600, train_split=0.75, shuffle_seq=True, seed=7)
    assert data["x"].shape == (450, 40) and data["x_test"].shape == (150, 40)
    for k in ("x", "y", "x_test", "y_test"):
        np.testing.assert_array_equal(data[k], ref[k])
    plain = load_mnist1d(num_samples=600, train_split=0.75, seed=7)
    np.testing.assert_array_equal(plain["y"], data["y"])  # same examples ...
    assert not np.array_equal(plain["x"], data["x"])  # ... with positions permuted
    np.testing.assert_allclose(np.sort(plain["x"], axis=1), np.sort(data["x"], axis=1), atol=1e-12)


def test_cache_round_trip(tmp_path, monkeypatch):
    cache = tmp_path / "c"
    first = load_mnist1d(num_samples=200, cache_dir=cache)
    files = list((cache / "mnist1d").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"

    def must_not_generate(args):
        raise AssertionError("expected the cached arrays to be used")

    monkeypatch.setattr(m1d, "_generate", must_not_generate)
    second = load_mnist1d(num_samples=200, cache_dir=cache)
    for k in m1d.KEYS:
        np.testing.assert_array_equal(first[k], second[k])
    # other arguments are another cache entry, so they regenerate
    with pytest.raises(AssertionError, match="cached"):
        load_mnist1d(num_samples=200, seed=1, cache_dir=cache)


def test_corrupt_cache_is_regenerated(tmp_path):
    cache = tmp_path / "c"
    good = load_mnist1d(num_samples=100, cache_dir=cache)
    (path,) = (cache / "mnist1d").iterdir()
    path.write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="unreadable MNIST-1D cache"):
        again = load_mnist1d(num_samples=100, cache_dir=cache)
    np.testing.assert_array_equal(good["x"], again["x"])
    assert np.load(path)["x"].shape == good["x"].shape  # rewritten correctly


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_samples >= 10"):
        load_mnist1d(num_samples=5)
    with pytest.raises(ValueError, match="train_split"):
        load_mnist1d(train_split=1.0)


def test_as_dataset():
    ds = load_dataset("mnist1d", num_samples=300, seed=3)
    ref = load_mnist1d(num_samples=300, seed=3)
    assert ds.input_shape == (40, 1) and ds.num_classes == 10
    assert ds.train["x"].shape == (240, 40, 1) and ds.train["x"].dtype == np.float32
    assert ds.test["y"].dtype == np.int32 and ds.test["y"].shape == (60,)
    np.testing.assert_array_equal(ds.train["x"][..., 0], ref["x"].astype(np.float32))
    np.testing.assert_array_equal(ds.test["y"], ref["y_test"])


def test_the_cache_is_on_by_default_and_returns_the_same_arrays(tmp_path, monkeypatch):
    first = load_mnist1d(num_samples=100)
    (path,) = (tmp_path / "cache" / "mnist1d").glob("*.npz")
    monkeypatch.setattr(m1d, "_generate", lambda args: (_ for _ in ()).throw(AssertionError("regenerated")))
    second = load_mnist1d(num_samples=100)  # read back, not generated
    for k in m1d.KEYS:
        np.testing.assert_array_equal(first[k], second[k])
    with pytest.raises(AssertionError, match="regenerated"):
        load_mnist1d(num_samples=100, cache=False)  # no cache: generated (here: the patched generator)


def test_an_unwritable_cache_only_warns(tmp_path, monkeypatch):
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("FUNDL_CACHE_DIR", str(blocker))
    with pytest.warns(UserWarning, match="could not cache MNIST-1D"):
        data = load_mnist1d(num_samples=100)
    assert data["x"].shape == (80, 40)
