"""MNIST-1D (Greydanus & Kobak) generated offline by the ``mnist1d`` package.

We call ``mnist1d.data.make_dataset`` directly — never ``get_dataset``, which
tries the network and writes a pickle into the working directory — and put
back Python's and NumPy's global RNG state afterwards, because the generator
reseeds both. The result is exactly ``make_dataset``'s output. The arrays are
cached as an ``.npz`` in the user cache (``~/.cache/fundl/mnist1d/``, or
``$FUNDL_CACHE_DIR``), keyed by the arguments and the ``mnist1d`` version:
generating is slow (scipy interpolation) and reading the cache is not, a
difference ``make train``'s wall time feels (figures in docs/benchmarks.md,
"Start-up").  ``cache=False`` turns it off; an unwritable cache only costs
the regeneration (with a warning).
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
import zipfile
from pathlib import Path

import numpy as np

from fundl.data import paths

KEYS = ("x", "y", "x_test", "y_test", "t")


@contextlib.contextmanager
def preserved_global_rng():
    """Restore ``random`` and ``np.random`` global states on exit, whatever happened inside."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def load_mnist1d(*, num_samples: int = 5000, train_split: float = 0.8, shuffle_seq: bool = False,
                 seed: int = 42, cache: bool | None = None,
                 cache_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Generate MNIST-1D; defaults are the paper's (4000 train, 1000 test sequences of length 40).

    Returns ``make_dataset``'s arrays unchanged: ``x`` (N, 40) float64, ``y`` (N,)
    int64, ``x_test``, ``y_test`` and the time grid ``t``. ``num_samples`` is rounded
    down to a multiple of 10 (one tenth per class). ``shuffle_seq=True`` is the
    paper's variant with a fixed random permutation of the 40 positions.
    ``cache`` (default on) keeps the arrays in ``<cache_dir or user cache>/mnist1d/``.
    """
    args = {"num_samples": int(num_samples), "train_split": float(train_split),
            "shuffle_seq": bool(shuffle_seq), "seed": int(seed)}
    if args["num_samples"] < 10:
        raise ValueError(f"mnist1d: expected num_samples >= 10 (one per class), got {num_samples}")
    if not 0.0 < args["train_split"] < 1.0:
        raise ValueError(f"mnist1d: expected 0 < train_split < 1, got {train_split}")
    use_cache = True if cache is None else cache
    path = _cache_path(args, cache_dir) if use_cache else None
    if path is not None and path.exists():
        cached = _read_cache(path)
        if cached is not None:
            return cached
    data = _generate(args)
    if path is not None:
        _write_cache(path, data)
    return data


def _generate(args: dict) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset  # lazy: pulls in scipy and matplotlib

    full = get_dataset_args(as_dict=True)
    full.update(args)
    view = get_dataset_args()  # an ObjectView, the type make_dataset expects
    view.__dict__.update(full)
    with preserved_global_rng():
        raw = make_dataset(view)
    return {k: np.asarray(raw[k]) for k in KEYS}


def _cache_path(args: dict, cache_dir) -> Path:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("mnist1d")
    except PackageNotFoundError:
        ver = "unknown"
    tag = (f"n{args['num_samples']}_split{args['train_split']:g}_seed{args['seed']}"
           f"{'_shuffle' if args['shuffle_seq'] else ''}_v{ver}")
    return paths.cache_dir(cache_dir) / "mnist1d" / f"mnist1d_{tag}.npz"


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in KEYS}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        warnings.warn(f"{path}: unreadable MNIST-1D cache ({e}); regenerating it", stacklevel=3)
        return None
    return data


def _write_cache(path: Path, data: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, **data)
        os.replace(tmp, path)  # atomic: readers never see a half-written cache
    except OSError as e:
        warnings.warn(f"could not cache MNIST-1D in {path.parent} ({e.strerror or e}); it will be "
                      f"generated again next time (set FUNDL_CACHE_DIR to a writable folder)", stacklevel=3)
    finally:
        if tmp.exists():
            tmp.unlink()
