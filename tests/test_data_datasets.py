"""load_dataset: one entry point, consistent shapes and dtypes, helpful errors."""

import dataclasses

import numpy as np
import pytest

from fundl.data import Dataset, load_dataset
from fundl.data.datasets import options


def _softmax_regression_accuracy(ds, steps=300, lr=0.5):
    """Plain NumPy multinomial logistic regression: test accuracy after full-batch gradient descent."""
    x = ds.train["x"].reshape(len(ds.train["x"]), -1)
    onehot = np.eye(ds.num_classes)[ds.train["y"]]
    w = np.zeros((x.shape[1], ds.num_classes))
    for _ in range(steps):
        logits = x @ w
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        w -= lr * x.T @ (p - onehot) / len(x)
    xt = ds.test["x"].reshape(len(ds.test["x"]), -1)
    return float(np.mean(np.argmax(xt @ w, 1) == ds.test["y"]))


def test_synthetic_is_learnable_and_deterministic():
    ds = load_dataset("synthetic")
    assert isinstance(ds, Dataset) and ds.name == "synthetic"
    assert ds.train["x"].shape == (1024, 16) and ds.train["x"].dtype == np.float32
    assert ds.train["y"].dtype == np.int32 and ds.test["x"].shape == (256, 16)
    assert set(np.unique(ds.train["y"])) == set(range(4))  # every class present
    assert _softmax_regression_accuracy(ds) > 0.85  # far above the 0.25 of chance
    again = load_dataset("synthetic")
    np.testing.assert_array_equal(ds.train["x"], again.train["x"])
    other = load_dataset("synthetic", seed=1)
    assert not np.array_equal(ds.train["y"], other.train["y"])


def test_synthetic_image_shaped():
    ds = load_dataset("synthetic", num_train=64, num_test=32, input_shape=(28, 28, 1), num_classes=10, seed=2)
    assert ds.input_shape == (28, 28, 1) and ds.num_classes == 10
    assert ds.train["x"].shape == (64, 28, 28, 1) and ds.test["y"].shape == (32,)
    assert ds.train["y"].max() < 10
    with pytest.raises(ValueError, match="num_classes >= 2"):
        load_dataset("synthetic", num_classes=1)


def test_dataset_is_frozen_and_positional():
    ds = Dataset("n", {"x": np.zeros((1, 2))}, {"x": np.zeros((1, 2))}, 3, (2,))
    assert ds.meta == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "m"


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar'; valid names: \['fashion_mnist', 'mnist', 'mnist1d', 'shakespeare', 'synthetic', 'text'\]"):
        load_dataset("cifar")
    assert load_dataset("Synthetic", num_train=4, num_test=4).name == "synthetic"


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match=r"load_dataset\('mnist1d'\): unknown option\(s\) \['batch'\]; valid options: num_samples=5000, train_split=0.8, shuffle_seq=False, seed=42, cache_dir=None"):
        load_dataset("mnist1d", batch=3)
    with pytest.raises(ValueError, match="valid options: normalize=True, cache_dir=None"):
        load_dataset("fashion_mnist", seq_len=3)


def test_options_table():
    assert options("shakespeare") == {"path": None, "seq_len": 128, "val_fraction": 0.1, "stride": None}
    assert options("text") == options("shakespeare")
    assert set(options("synthetic")) == {"num_train", "num_test", "input_shape", "num_classes", "seed"}


def test_text_not_found_lists_places(tmp_path, monkeypatch):
    monkeypatch.setenv("FUNDL_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("FUNDL_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("shakespeare")
    assert str(tmp_path / "nowhere" / "text" / "tinyshakespeare.txt") in str(e.value) and "path=" in str(e.value)


def test_import_is_light():
    """Importing fundl.data must not pull in mnist1d (scipy, matplotlib, requests) or urllib: they load on use."""
    import subprocess
    import sys

    heavy = ("mnist1d", "matplotlib", "scipy", "requests", "tqdm", "urllib.request")
    code = f"import sys, fundl.data; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
