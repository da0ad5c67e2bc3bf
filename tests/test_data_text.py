"""Character corpus: vocabulary, encode/decode, split, next-character windows, bad input."""

import os
from pathlib import Path

import numpy as np
import pytest

from fundl.data import CharCorpus, DataError, Vocabulary, load_dataset, windows


def test_vocabulary_round_trip():
    v = Vocabulary.from_text("hello, world")
    assert v.chars == " ,dehlorw" and v.size == 9
    ids = v.encode("hello")
    assert ids.dtype == np.int32 and ids.tolist() == [4, 3, 5, 5, 6]
    assert v.decode(ids) == "hello" and v.decode([]) == ""
    assert Vocabulary.from_text("é→x").decode(Vocabulary.from_text("é→x").encode("x→é")) == "x→é"


def test_vocabulary_errors():
    v = Vocabulary("abc")
    with pytest.raises(ValueError, match=r"character 'z' at position 2 is not in the 3-symbol"):
        v.encode("abz")
    with pytest.raises(ValueError, match=r"expected ids in \[0, 3\), got range \[0, 3\]"):
        v.decode([0, 3])
    with pytest.raises(ValueError, match="duplicates"):
        Vocabulary("aba")


def test_empty_corpus_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(DataError, match="expected a non-empty text corpus, got 0 characters") as e:
        CharCorpus.from_file(path)
    assert str(path) in str(e.value)


def test_file_checks(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"abc\xff")
    with pytest.raises(DataError, match="expected utf-8 text"):
        CharCorpus.from_file(path)
    with pytest.raises(DataError, match="checksum mismatch: expected sha256 00"):
        CharCorpus.from_file(path, sha256="00" * 32)


def test_split_is_contiguous():
    c = CharCorpus.from_text("abcdefghij")
    train, val = c.split(0.2)
    assert c.vocab.decode(train) == "abcdefgh" and c.vocab.decode(val) == "ij"
    with pytest.raises(ValueError, match="val_fraction"):
        c.split(1.0)


def test_windows_are_shifted_by_one():
    ids = np.arange(11)
    x, y = windows(ids, 3)
    assert x.dtype == y.dtype == np.int32 and x.shape == y.shape == (3, 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    np.testing.assert_array_equal(y, x + 1)
    x, y = windows(ids, 4, stride=2)
    assert x[:, 0].tolist() == [0, 2, 4, 6] and y[-1].tolist() == [7, 8, 9, 10]
    with pytest.raises(ValueError, match="at least seq_len \\+ 1 = 12 ids, got 11"):
        windows(ids, 11)


def test_text_dataset_from_path(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("to be or not to be, that is the question. " * 20)
    ds = load_dataset("text", path=str(path), seq_len=16, val_fraction=0.25)
    vocab = ds.meta["vocab"]
    assert ds.num_classes == vocab.size == len(set(path.read_text())) and ds.input_shape == (16,)
    assert ds.train["x"].dtype == np.int32 and ds.train["x"].shape[1] == 16
    np.testing.assert_array_equal(ds.train["x"][:, 1:], ds.train["y"][:, :-1])
    assert vocab.decode(ds.train["x"][0]) == path.read_text()[:16]
    n = len(path.read_text())
    assert ds.test["x"].shape[0] == (n - (n - round(n * 0.25)) - 1) // 16


def _shakespeare_dir():
    env = os.environ.get("FUNDL_DATA_DIR")
    if not env or not (Path(env) / "text" / "tinyshakespeare.txt").is_file():
        pytest.skip("Tiny Shakespeare not found: set FUNDL_DATA_DIR to the shared data folder holding text/tinyshakespeare.txt")
    return Path(env)


def test_tiny_shakespeare():
    root = _shakespeare_dir()
    corpus = CharCorpus.from_file(root / "text" / "tinyshakespeare.txt")
    assert len(corpus.text) == 1_115_394 and corpus.vocab.size == 65
    assert corpus.vocab.decode(corpus.encode()[:14]) == "First Citizen:"
    ds = load_dataset("shakespeare", seq_len=100, val_fraction=0.1)  # found via FUNDL_DATA_DIR, sha256-checked
    assert ds.num_classes == 65 and ds.train["x"].shape == (10038, 100) and ds.test["x"].shape == (1115, 100)
