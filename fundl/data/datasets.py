"""One entry point from a dataset name to train/test arrays: :func:`load_dataset`.

Every dataset comes back in the same shape — a :class:`Dataset` with NumPy
``train``/``test`` dicts of ``{"x", "y"}`` — so the training loop, configs and
benchmarks never special-case a source. Options are per dataset; an unknown
name or option is an error listing the valid ones.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from fundl.data import paths
from fundl.data.errors import DataNotFoundError
from fundl.data.mnist import load_idx_dataset
from fundl.data.mnist1d import load_mnist1d
from fundl.data.text import CharCorpus, windows

TINY_SHAKESPEARE = "tinyshakespeare.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test arrays plus what a model needs to know about them.

    ``meta`` holds extras some users need (normalisation mean/std, the text
    vocabulary for decoding samples, source files); it may be empty.
    ``train`` and ``test`` are ``{"x": (N, *input_shape), "y": (N,) int32}``
    (for text, ``y`` is ``(N, T)``: the next characters).

    Examples:
        >>> from fundl.data import load_dataset
        >>> ds = load_dataset("synthetic", num_train=256, input_shape=(28, 28, 1), num_classes=10)
        >>> ds.name, ds.train["x"].shape, ds.train["y"].dtype, ds.num_classes, ds.input_shape
        ('synthetic', (256, 28, 28, 1), dtype('int32'), 10, (28, 28, 1))
    """

    name: str
    train: dict[str, np.ndarray]   # {"x": float32 or int32 array, "y": int32 labels}
    test: dict[str, np.ndarray]
    num_classes: int               # vocab size for text
    input_shape: tuple[int, ...]   # per-example shape of x, e.g. (28, 28, 1), (40, 1), (T,)
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _idx_images(name: str, data_dir, *, normalize: bool = True, cache_dir: str | None = None) -> Dataset:
    """MNIST-format images: x float32 (N, 28, 28, 1) in [0, 1], standardised by the train mean/std if ``normalize``."""
    raw = load_idx_dataset(name, data_dir, cache_dir)
    splits = {s: {"x": (img.astype(np.float32) / 255.0)[..., None], "y": lbl.astype(np.int32)}
              for s, (img, lbl) in raw.items()}
    meta: dict[str, Any] = {}
    if normalize:
        mean = float(splits["train"]["x"].mean(dtype=np.float64))
        std = float(splits["train"]["x"].std(dtype=np.float64))
        for split in splits.values():
            split["x"] = ((split["x"] - np.float32(mean)) / np.float32(std)).astype(np.float32)
        meta.update(mean=mean, std=std)
    return Dataset(name, splits["train"], splits["test"], 10, (28, 28, 1), meta)


def _mnist(data_dir, *, normalize: bool = True, cache_dir: str | None = None) -> Dataset:
    return _idx_images("mnist", data_dir, normalize=normalize, cache_dir=cache_dir)


def _fashion_mnist(data_dir, *, normalize: bool = True, cache_dir: str | None = None) -> Dataset:
    return _idx_images("fashion_mnist", data_dir, normalize=normalize, cache_dir=cache_dir)


def _mnist1d(data_dir, *, num_samples: int = 5000, train_split: float = 0.8, shuffle_seq: bool = False,
             seed: int = 42, cache_dir: str | None = None) -> Dataset:
    """MNIST-1D: x float32 (N, 40, 1) (already standardised by the generator), y int32."""
    d = load_mnist1d(num_samples=num_samples, train_split=train_split, shuffle_seq=shuffle_seq,
                     seed=seed, cache_dir=cache_dir)
    train = {"x": d["x"].astype(np.float32)[..., None], "y": d["y"].astype(np.int32)}
    test = {"x": d["x_test"].astype(np.float32)[..., None], "y": d["y_test"].astype(np.int32)}
    return Dataset("mnist1d", train, test, 10, (train["x"].shape[1], 1), {"t": d["t"]})


def find_text(filename: str, data_dir) -> Path:
    """``filename`` in ``data_dir``, ``$FUNDL_DATA_DIR`` or the cache (each directly or under ``text/``)."""
    searched = []
    for origin, directory in paths.candidate_dirs(("text",), data_dir, None, ()):
        candidate = directory / filename
        if candidate.is_file():
            return candidate
        searched.append(f"{candidate} ({origin})")
    raise DataNotFoundError(
        f"{filename} not found. Searched, in order:\n" + "\n".join(f"  - {s}" for s in searched)
        + f"\nPass path=<file>, or set {paths.DATA_DIR_ENV} to a folder holding it (or holding text/{filename})."
    )


def _text(data_dir, *, path: str | None = None, seq_len: int = 128, val_fraction: float = 0.1,
          stride: int | None = None, name: str = "text") -> Dataset:
    """Next-character windows: x, y int32 (N, seq_len), ``y`` shifted by one; "test" is the validation split.

    Without ``path``, Tiny Shakespeare is looked up like other data and its sha256 verified.
    """
    if path is None:
        corpus = CharCorpus.from_file(find_text(TINY_SHAKESPEARE, data_dir), sha256=TINY_SHAKESPEARE_SHA256)
    else:
        corpus = CharCorpus.from_file(path)
    train_ids, val_ids = corpus.split(val_fraction)
    x, y = windows(train_ids, seq_len, stride)
    vx, vy = windows(val_ids, seq_len, stride)
    meta = {"vocab": corpus.vocab, "source": corpus.source}
    return Dataset(name, {"x": x, "y": y}, {"x": vx, "y": vy}, corpus.vocab.size, (seq_len,), meta)


def _shakespeare(data_dir, **options) -> Dataset:
    return _text(data_dir, name="shakespeare", **options)


def _text_named(data_dir, *, path: str | None = None, seq_len: int = 128, val_fraction: float = 0.1,
                stride: int | None = None) -> Dataset:
    return _text(data_dir, path=path, seq_len=seq_len, val_fraction=val_fraction, stride=stride)


def _synthetic(data_dir, *, num_train: int = 1024, num_test: int = 256, input_shape: tuple[int, ...] = (16,),
               num_classes: int = 4, seed: int = 0) -> Dataset:
    """A learnable classification task: x ~ N(0, 1) float32, y = argmax(flatten(x) @ W) for a fixed random W.

    A linear model can reach 100% accuracy, so a falling loss is a real signal;
    generation is instant, for fast tests and benchmarks.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if num_classes < 2 or num_train < 1 or num_test < 1 or not input_shape or min(input_shape) < 1:
        raise ValueError(
            f"synthetic: expected num_classes >= 2, num_train >= 1, num_test >= 1 and a non-empty input_shape of "
            f"positive dims, got num_classes={num_classes}, num_train={num_train}, num_test={num_test}, "
            f"input_shape={input_shape}"
        )
    rng = np.random.default_rng(seed)
    dim = int(np.prod(input_shape))
    teacher = rng.standard_normal((dim, num_classes)).astype(np.float32)

    def split(n: int) -> dict[str, np.ndarray]:
        x = rng.standard_normal((n,) + input_shape, dtype=np.float32)
        y = np.argmax(x.reshape(n, dim) @ teacher, axis=1).astype(np.int32)
        return {"x": x, "y": y}

    return Dataset("synthetic", split(num_train), split(num_test), num_classes, input_shape, {"teacher": teacher})


LOADERS: dict[str, Callable[..., Dataset]] = {
    "mnist": _mnist,
    "fashion_mnist": _fashion_mnist,
    "mnist1d": _mnist1d,
    "shakespeare": _shakespeare,
    "text": _text_named,
    "synthetic": _synthetic,
}


def options(name: str) -> dict[str, Any]:
    """The options ``name`` accepts, with their defaults."""
    fn = LOADERS[_canonical(name)]
    target = _text if fn is _shakespeare else fn
    return {p.name: p.default for p in inspect.signature(target).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name != "name"}


def _canonical(name: str) -> str:
    key = name.replace("-", "_").lower()
    if key not in LOADERS:
        raise ValueError(f"load_dataset: unknown dataset {name!r}; valid names: {sorted(LOADERS)}")
    return key


def load_dataset(name: str, *, data_dir: str | os.PathLike | None = None, **opts) -> Dataset:
    """Load dataset ``name`` with its options; ``fundl.data.datasets.options(name)`` lists what each accepts.

    Names: ``"mnist"``, ``"fashion_mnist"`` (files found in ``data_dir``,
    ``FUNDL_DATA_DIR`` or the usual places, md5-verified; nothing is
    downloaded), ``"mnist1d"`` (generated offline), ``"shakespeare"``/``"text"``
    (a character corpus) and ``"synthetic"``.  Unknown names and options are
    errors that list the valid ones.

    Examples:
        >>> from fundl.data import load_dataset
        >>> ds = load_dataset("mnist", data_dir="/data")       # doctest: +SKIP
        >>> ds = load_dataset("mnist1d")                       # doctest: +SKIP
        >>> ds = load_dataset("synthetic", num_train=256, input_shape=(28, 28, 1), num_classes=10)
        >>> load_dataset("synthetic", num_trian=256)
        Traceback (most recent call last):
        ...
        ValueError: load_dataset('synthetic'): unknown option(s) ['num_trian']; valid options: ...
    """
    key = _canonical(name)
    valid = options(key)
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ValueError(
            f"load_dataset({name!r}): unknown option(s) {unknown}; valid options: "
            + ", ".join(f"{k}={v!r}" for k, v in valid.items())
        )
    return LOADERS[key](data_dir, **opts)
