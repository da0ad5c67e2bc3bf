"""Format 1, fundl's checkpoints before Orbax: every leaf in one ``arrays.npz``, its sha256 in the manifest.

Only read (they still restore, verify and mix with newer checkpoints); fundl writes format 2.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from fundl.train.checkpoint.errors import CheckpointError
from fundl.train.checkpoint.tree import target_sharding

ARRAYS = "arrays.npz"


def manifest_files(path: Path, manifest: dict) -> dict[str, str]:
    """``{file: sha256}`` of a format-1 checkpoint, as format 2 lists them in ``files``."""
    if "sha256" not in manifest:
        raise CheckpointError(f"checkpoint {path}: manifest.json (format 1) lacks 'sha256'")
    return {ARRAYS: manifest["sha256"]}


def read_leaves(path: Path, leaves) -> list:
    """The template's ``(tree path, leaf)`` list filled from ``arrays.npz``, each placed where its
    template leaf says (``tree.target_sharding``)."""
    try:
        with np.load(path / ARRAYS, allow_pickle=False) as data:
            return [_place(data[p], target_sharding(leaf)) for p, leaf in leaves]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {ARRAYS} ({e})") from None


def read_all(path: Path) -> dict[str, np.ndarray]:
    """Every stored leaf as NumPy, by tree path."""
    with np.load(path / ARRAYS, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _place(x: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
