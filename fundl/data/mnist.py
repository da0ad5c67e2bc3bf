"""MNIST and Fashion-MNIST from local IDX files: find them, verify them, load them.

Search order: an explicit ``data_dir``, ``$FUNDL_DATA_DIR``, the user cache
(where :func:`fundl.data.download` puts files), then system locations such as
``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).
Nothing is downloaded here; when the files are missing the error lists every
place searched and the ways to obtain them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fundl.data import catalog, paths
from fundl.data.errors import DataError, DataNotFoundError
from fundl.data.idx import md5_hex, read_bytes, read_idx

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def _existing(directory: Path, filename: str) -> Path | None:
    for candidate in (directory / filename, directory / f"{filename}.gz"):
        if candidate.is_file():
            return candidate
    return None


def locate(name: str, data_dir: str | os.PathLike | None = None,
           cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of the dataset's files (name without ``.gz`` -> path) from the first directory holding all of them.

    A directory holding all files of a *different* known dataset (recognised by
    the md5 of its training labels) is skipped, so ``FUNDL_DATA_DIR`` may point
    straight at MNIST files without hiding Fashion-MNIST installed elsewhere.
    """
    spec = catalog.get(name)
    searched = []
    for origin, directory in paths.candidate_dirs(spec.aliases, data_dir, cache_dir, spec.system_dirs):
        if not directory.is_dir():
            searched.append(f"{directory} ({origin}): no such directory")
            continue
        found = {f.filename: _existing(directory, f.filename) for f in spec.files}
        missing = [n for n, p in found.items() if p is None]
        if len(missing) == len(found):
            searched.append(f"{directory} ({origin}): none of the files")
            continue
        if missing:
            searched.append(f"{directory} ({origin}): incomplete, missing {', '.join(missing)}")
            continue
        labels = found[spec.splits["train"][1].filename]
        other = catalog.identify(md5_hex(read_bytes(labels)))
        if other is not None and other[0] != spec.name:
            searched.append(f"{directory} ({origin}): holds {other[0]} files, not {spec.name}")
            continue
        return found
    raise DataNotFoundError(_not_found_message(spec, searched, cache_dir))


def _not_found_message(spec: catalog.IdxDataset, searched: list[str], cache_dir) -> str:
    names = ", ".join(f"{f.filename}[.gz]" for f in spec.files)
    ways = [
        f"set {paths.DATA_DIR_ENV}=<folder> (or pass data_dir=<folder>) where <folder> holds the files "
        f"or a sub-folder named {' or '.join(spec.aliases[:2])}",
    ]
    if spec.apt_package:
        where = f"  (installs them in {spec.system_dirs[0]})" if spec.system_dirs else ""
        ways.append(f"apt-get install {spec.apt_package}{where}")
    ways.append(
        f"with internet: python -c \"import fundl.data as d; d.download('{spec.name}')\"  "
        f"(writes to {paths.cache_dir(cache_dir) / spec.name}, verified by md5)"
    )
    return (
        f"{spec.name}: files not found ({names}).\nSearched, in order:\n"
        + "\n".join(f"  - {s}" for s in searched)
        + "\nTo obtain them, any of:\n"
        + "\n".join(f"  - {w}" for w in ways)
    )


def load_idx_dataset(name: str, data_dir: str | os.PathLike | None = None,
                     cache_dir: str | os.PathLike | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": (images, labels)}`` as uint8, every file md5-verified.

    Images are ``(N, 28, 28)``; labels ``(N,)`` and checked to lie in ``[0, num_classes)``.
    """
    spec = catalog.get(name)
    files = locate(spec.name, data_dir, cache_dir)
    out = {}
    for split, (img_spec, lbl_spec) in spec.splits.items():
        img_path, lbl_path = files[img_spec.filename], files[lbl_spec.filename]
        images = read_idx(img_path, md5=img_spec.md5, magic=IMAGES_MAGIC, shape=img_spec.shape)
        labels = read_idx(lbl_path, md5=lbl_spec.md5, magic=LABELS_MAGIC, shape=lbl_spec.shape)
        out[split] = (images, check_labels(labels, spec.num_classes, lbl_path))
    return out


def check_labels(labels: np.ndarray, num_classes: int, source) -> np.ndarray:
    """``labels`` unchanged if every value is in ``[0, num_classes)``, else a DataError naming ``source``."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{source}: expected labels in [0, {num_classes}), got {labels[i]} at index {i} "
            f"({bad.size} out of range)"
        )
    return labels
