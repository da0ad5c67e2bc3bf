"""Real MNIST and Fashion-MNIST files, when present: shapes, label counts, checksums, normalisation.

MNIST is found through FUNDL_DATA_DIR (CI: ../shared/data); Fashion-MNIST through
FUNDL_DATA_DIR or the Debian package's system location. Each test skips, saying
why, when its files are absent.
"""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from fundl.data import DataNotFoundError, catalog, load_dataset, load_idx_dataset, locate
from fundl.data.idx import read_bytes

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(autouse=True)
def no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FUNDL_CACHE_DIR", str(tmp_path / "cache"))  # only the real locations count


def _mnist_dir():
    env = os.environ.get("FUNDL_DATA_DIR")
    if not env:
        pytest.skip("MNIST files not available: FUNDL_DATA_DIR is not set (CI sets it to ../shared/data)")
    try:
        return locate("mnist")["train-images-idx3-ubyte"].parent
    except DataNotFoundError:
        pytest.skip(f"MNIST files not found under FUNDL_DATA_DIR={env} (expected mnist/*-idx?-ubyte.gz)")


def _fashion_dir():
    try:
        return locate("fashion_mnist")["train-images-idx3-ubyte"].parent
    except DataNotFoundError:
        pytest.skip("Fashion-MNIST files not found: apt-get install dataset-fashion-mnist, or set FUNDL_DATA_DIR")


def test_mnist_files_shapes_counts_md5():
    root = _mnist_dir()
    for f in catalog.MNIST.files:
        assert hashlib.md5(read_bytes(root / f"{f.filename}.gz")).hexdigest() == f.md5
    data = load_idx_dataset("mnist")
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    assert xtr.shape == (60000, 28, 28) and ytr.shape == (60000,) and xtr.dtype == np.uint8
    assert xte.shape == (10000, 28, 28) and yte.shape == (10000,)
    assert np.bincount(ytr, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(yte, minlength=10).sum() == 10000 and yte.max() == 9


@pytest.mark.slow
def test_mnist_dataset_normalised():
    _mnist_dir()
    ds = load_dataset("mnist")
    assert ds.train["x"].shape == (60000, 28, 28, 1) and ds.train["x"].dtype == np.float32
    assert ds.input_shape == (28, 28, 1) and ds.num_classes == 10 and ds.train["y"].dtype == np.int32
    assert ds.meta["mean"] == pytest.approx(0.1307, abs=1e-4) and ds.meta["std"] == pytest.approx(0.3081, abs=1e-4)
    assert abs(float(ds.train["x"].mean())) < 1e-3 and float(ds.train["x"].std()) == pytest.approx(1.0, abs=1e-3)
    raw = load_dataset("mnist", normalize=False)
    assert float(raw.test["x"].min()) == 0.0 and float(raw.test["x"].max()) == 1.0


@pytest.mark.slow
def test_fashion_mnist():
    _fashion_dir()
    ds = load_dataset("fashion_mnist")
    assert ds.train["x"].shape == (60000, 28, 28, 1) and ds.test["x"].shape == (10000, 28, 28, 1)
    assert np.bincount(ds.train["y"]).tolist() == [6000] * 10
    assert np.bincount(ds.test["y"]).tolist() == [1000] * 10
    assert ds.meta["mean"] == pytest.approx(0.2860, abs=1e-4) and ds.meta["std"] == pytest.approx(0.3530, abs=1e-4)


def test_fashion_not_confused_with_mnist(monkeypatch):
    """FUNDL_DATA_DIR pointing straight at MNIST files must not serve them as Fashion-MNIST."""
    mnist = _mnist_dir()
    fashion = _fashion_dir()
    monkeypatch.setenv("FUNDL_DATA_DIR", str(mnist))
    assert locate("mnist")["t10k-labels-idx1-ubyte"].parent == mnist
    assert locate("fashion_mnist")["t10k-labels-idx1-ubyte"].parent == fashion
    assert Path(fashion) != Path(mnist)
