"""IDX files: round trips, every kind of corruption, and named-dataset lookup (on generated files)."""

import gzip
import hashlib

import numpy as np
import pytest

from fundl.data import DataError, DataNotFoundError, catalog, locate, load_idx_dataset, read_idx, write_idx
from fundl.data.idx import encode_idx


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path, no_network):
    """No user data dir, a throwaway cache, and no network: loading never downloads implicitly."""
    monkeypatch.delenv("FUNDL_DATA_DIR", raising=False)
    monkeypatch.setenv("FUNDL_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_round_trip(tmp_path, dtype, suffix):
    a = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    path = write_idx(tmp_path / f"a-idx3{suffix}", a)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    b = read_idx(path)
    assert b.dtype == a.dtype and b.dtype.isnative and b.shape == a.shape
    np.testing.assert_array_equal(a, b)
    b[0, 0, 0] = 1  # a writable copy, not a view of the file buffer


def test_known_bytes():
    """The layout is the published one: magic 0x00000801 for 1-D uint8, big-endian dims, then data."""
    assert encode_idx(np.array([1, 2, 3], np.uint8)) == b"\0\0\x08\x01\0\0\0\x03\x01\x02\x03"
    assert encode_idx(np.array([[258]], np.int32)) == b"\0\0\x0c\x02\0\0\0\x01\0\0\0\x01\0\0\x01\x02"


def test_gzip_detected_by_content_not_name(tmp_path):
    a = np.arange(10, dtype=np.uint8)
    path = write_idx(tmp_path / "labels", a, compress=True)  # gzip without a .gz name
    np.testing.assert_array_equal(read_idx(path), a)


def test_md5_is_of_decompressed_bytes(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    digest = hashlib.md5(encode_idx(a)).hexdigest()
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a.gz", a), md5=digest), a)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a", a), md5=digest), a)


def _raw(tmp_path, data, name="bad-idx"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


GOOD = encode_idx(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize("data, match", [
    (GOOD[:-1], r"expected 40 bytes .* got 39 \(truncated\)"),
    (GOOD + b"\0", r"expected 40 bytes .* got 41 \(trailing bytes\)"),
    (GOOD[:10], r"expected a 16-byte header .* got 10 bytes \(truncated\)"),
    (GOOD[:3], r"expected at least a 4-byte IDX header, got 3"),
    (b"\x01" + GOOD[1:], r"expected an IDX magic number .* got 0x01000803"),
    (GOOD[:2] + b"\x07" + GOOD[3:], r"got 0x00000703"),
    (GOOD[:3] + b"\x00" + GOOD[4:], r"got 0x00000800"),
])
def test_corrupt_raw_files_name_the_file(tmp_path, data, match):
    path = _raw(tmp_path, data)
    with pytest.raises(DataError, match=match) as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_truncated_gzip(tmp_path):
    data = gzip.compress(GOOD * 50, mtime=0)
    path = _raw(tmp_path, data[: len(data) // 2], "t.gz")
    with pytest.raises(DataError, match="damaged or truncated") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_expected_magic_and_dims(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros((2, 3, 4), np.uint8))
    assert read_idx(path, magic=2051, shape=(None, 3, 4)).shape == (2, 3, 4)
    with pytest.raises(DataError, match=r"expected magic number 2049 .* got 2051") as e:
        read_idx(path, magic=2049)
    assert str(path) in str(e.value)
    with pytest.raises(DataError, match=r"expected dimensions \(None, 28, 28\), got \(2, 3, 4\)"):
        read_idx(path, shape=(None, 28, 28))
    with pytest.raises(DataError, match=r"expected dimensions \(2, 3\), got \(2, 3, 4\)"):
        read_idx(path, shape=(2, 3))


def test_checksum_mismatch(tmp_path):
    a = np.arange(12, dtype=np.uint8)
    good = hashlib.md5(encode_idx(a)).hexdigest()
    a[3] = 99  # same structure, different content
    path = write_idx(tmp_path / "a.gz", a)
    with pytest.raises(DataError, match=f"checksum mismatch: expected md5 {good}") as e:
        read_idx(path, md5=good)
    assert str(path) in str(e.value)


def test_write_rejects_unstorable_dtype(tmp_path):
    with pytest.raises(TypeError, match="IDX cannot store dtype"):
        write_idx(tmp_path / "x", np.zeros(3, np.int64))


# --------------------------------------------------------------- named datasets, on generated files

def _make_dataset(root, name, seed, n=(20, 10), labels_hi=3, num_classes=3, gz=True):
    """Write a tiny MNIST-like dataset into ``root`` and return its catalog entry."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, prefix, count in (("train", "train", n[0]), ("test", "t10k", n[1])):
        images = rng.integers(0, 256, (count, 4, 4), dtype=np.uint8)
        labels = rng.integers(0, labels_hi, count).astype(np.uint8)
        files = []
        for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            fname = f"{prefix}-{kind}"
            write_idx(root / (fname + (".gz" if gz else "")), arr)
            files.append(catalog.IdxFile(fname, hashlib.md5(encode_idx(arr)).hexdigest(), arr.shape))
        splits[split] = tuple(files)
    return catalog.IdxDataset(name=name, splits=splits, num_classes=num_classes, aliases=(name, name.replace("_", "-")),
                              system_dirs=(), mirrors=("http://127.0.0.1:9/none",), apt_package=f"dataset-{name}")


@pytest.fixture
def fake_catalog(monkeypatch):
    registry = {}
    monkeypatch.setattr(catalog, "IDX_DATASETS", registry)
    return registry


def test_load_and_search_order(tmp_path, fake_catalog, monkeypatch):
    explicit, env, system = tmp_path / "explicit", tmp_path / "env", tmp_path / "system" / "tiny"
    spec = _make_dataset(system, "tiny", seed=0)
    fake_catalog["tiny"] = spec = catalog.IdxDataset(**{**spec.__dict__, "system_dirs": (str(system),)})
    assert locate("tiny")["train-images-idx3-ubyte"].parent == system
    # the cache comes before system locations
    _make_dataset(tmp_path / "cache" / "tiny", "tiny", seed=0)
    assert locate("tiny")["train-images-idx3-ubyte"].parent == tmp_path / "cache" / "tiny"
    # FUNDL_DATA_DIR before the cache: files in a sub-folder named after the dataset (an alias) ...
    _make_dataset(env / "tiny-", "tiny", seed=0)
    _make_dataset(env / "tiny", "tiny", seed=0, gz=False)
    monkeypatch.setenv("FUNDL_DATA_DIR", str(env))
    assert locate("tiny")["t10k-labels-idx1-ubyte"] == env / "tiny" / "t10k-labels-idx1-ubyte"
    # ... or directly in the folder
    monkeypatch.setenv("FUNDL_DATA_DIR", str(env / "tiny-"))
    assert locate("tiny")["t10k-labels-idx1-ubyte"] == env / "tiny-" / "t10k-labels-idx1-ubyte.gz"
    # an explicit directory comes first
    _make_dataset(explicit, "tiny", seed=0)
    assert locate("tiny", data_dir=explicit)["train-images-idx3-ubyte"].parent == explicit
    data = load_idx_dataset("tiny", data_dir=explicit)
    assert data["train"][0].shape == (20, 4, 4) and data["test"][1].shape == (10,)
    assert data["train"][0].dtype == np.uint8


def test_skips_folder_of_another_known_dataset_but_not_a_corrupt_one(tmp_path, fake_catalog, monkeypatch):
    fake_catalog["tiny"] = _make_dataset(tmp_path / "cache" / "tiny", "tiny", seed=0)
    fake_catalog["other"] = _make_dataset(tmp_path / "env", "other", seed=1)
    monkeypatch.setenv("FUNDL_DATA_DIR", str(tmp_path / "env"))  # holds 'other' files directly
    assert locate("tiny")["train-images-idx3-ubyte"].parent == tmp_path / "cache" / "tiny"
    assert locate("other")["train-images-idx3-ubyte"].parent == tmp_path / "env"
    # a corrupted file where 'tiny' is expected is an error, never a silent fallback
    _make_dataset(tmp_path / "env2", "tiny", seed=5)  # same names, different content
    with pytest.raises(DataError, match="checksum mismatch") as e:
        load_idx_dataset("tiny", data_dir=tmp_path / "env2")
    assert str(tmp_path / "env2") in str(e.value)


def test_missing_files_error_lists_places_and_remedies(tmp_path, fake_catalog, monkeypatch):
    fake_catalog["tiny"] = _make_dataset(tmp_path / "elsewhere", "tiny", seed=0)
    partial = tmp_path / "env" / "tiny"
    _make_dataset(partial, "tiny", seed=0)
    (partial / "t10k-images-idx3-ubyte.gz").unlink()
    monkeypatch.setenv("FUNDL_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(DataNotFoundError) as e:
        locate("tiny", data_dir=tmp_path / "given")
    msg = str(e.value)
    for place in (tmp_path / "given", tmp_path / "given" / "tiny", tmp_path / "env", partial, tmp_path / "cache" / "tiny"):
        assert f"{place} (" in msg
    assert "incomplete, missing t10k-images-idx3-ubyte" in msg
    assert "FUNDL_DATA_DIR" in msg and "apt-get install dataset-tiny" in msg and "download('tiny')" in msg


def test_labels_out_of_range(tmp_path, fake_catalog):
    fake_catalog["tiny"] = _make_dataset(tmp_path / "d", "tiny", seed=0, labels_hi=5, num_classes=3)
    with pytest.raises(DataError, match=r"expected labels in \[0, 3\), got [34] at index \d+") as e:
        load_idx_dataset("tiny", data_dir=tmp_path / "d")
    assert "labels-idx1-ubyte" in str(e.value)


def test_wrong_dims_for_named_dataset(tmp_path, fake_catalog):
    spec = _make_dataset(tmp_path / "d", "tiny", seed=0)
    img = spec.splits["train"][0]
    fake_catalog["tiny"] = catalog.IdxDataset(**{**spec.__dict__, "splits": {
        **spec.splits, "train": (catalog.IdxFile(img.filename, img.md5, (20, 28, 28)), spec.splits["train"][1])}})
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: expected dimensions \(20, 28, 28\), got \(20, 4, 4\)"):
        load_idx_dataset("tiny", data_dir=tmp_path / "d")


def test_real_catalog_names():
    assert set(catalog.IDX_DATASETS) == {"mnist", "fashion_mnist"}
    assert catalog.get("fashion-mnist").name == "fashion_mnist"
    with pytest.raises(KeyError, match="known"):
        catalog.get("cifar10")
    assert catalog.identify(catalog.MNIST.files[0].md5) == ("mnist", "train-images-idx3-ubyte")
