"""What the named MNIST-format datasets look like and where they come from.

Checksums are md5 of the *decompressed* IDX bytes: mirrors re-gzip the files
with different headers (Debian's Fashion-MNIST ``.gz`` files differ from
Zalando's), but the decompressed content is the same everywhere.

- MNIST: the published md5 sums (see ``shared/data/README.md``).
- Fashion-MNIST: md5 of the decompressed files of Debian's
  ``dataset-fashion-mnist`` 0.0~git20200523 (whose ``.gz`` files do not match
  Zalando's published ``.gz`` md5s: Debian re-gzipped them). They equal the
  decompressed sums that public code and tutorials list next to Zalando's
  ``.gz`` sums after gunzipping the official files.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class IdxFile:
    """One IDX file: its name without ``.gz``, md5 of its decompressed bytes, and shape."""

    filename: str
    md5: str
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class IdxDataset:
    """A named image-classification dataset stored as four IDX files."""

    name: str
    splits: dict  # split -> (images IdxFile, labels IdxFile)
    num_classes: int
    aliases: tuple[str, ...]  # sub-folder names to look for
    system_dirs: tuple[str, ...]
    mirrors: tuple[str, ...]  # base URLs; files are fetched as <mirror>/<filename>.gz
    apt_package: str | None = None

    @property
    def files(self) -> tuple[IdxFile, ...]:
        return tuple(f for pair in self.splits.values() for f in pair)


def _splits(md5s: dict[str, str]) -> dict:
    def pair(prefix: str, n: int):
        return (
            IdxFile(f"{prefix}-images-idx3-ubyte", md5s[f"{prefix}-images"], (n, 28, 28)),
            IdxFile(f"{prefix}-labels-idx1-ubyte", md5s[f"{prefix}-labels"], (n,)),
        )

    return {"train": pair("train", 60000), "test": pair("t10k", 10000)}


MNIST = IdxDataset(
    name="mnist",
    splits=_splits({
        "train-images": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels": "a25bea736e30d166cdddb491f175f624",
        "t10k-images": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels": "27ae3e4e09519cfbb04c329615203637",
    }),
    num_classes=10,
    aliases=("mnist", "MNIST"),
    system_dirs=("/usr/share/datasets/mnist", "/usr/local/share/datasets/mnist"),
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist",
        "https://storage.googleapis.com/cvdf-datasets/mnist",
    ),
)

FASHION_MNIST = IdxDataset(
    name="fashion_mnist",
    splits=_splits({
        "train-images": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels": "15d484375f8d13e6eb1aabb0c3f46965",
    }),
    num_classes=10,
    aliases=("fashion_mnist", "fashion-mnist", "FashionMNIST"),
    system_dirs=("/usr/share/datasets/fashion-mnist", "/usr/local/share/datasets/fashion-mnist"),
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",),
    apt_package="dataset-fashion-mnist",
)

IDX_DATASETS: dict[str, IdxDataset] = {d.name: d for d in (MNIST, FASHION_MNIST)}


def get(name: str) -> IdxDataset:
    """The catalog entry for ``name``; unknown names list the known ones."""
    key = name.replace("-", "_").lower()
    if key not in IDX_DATASETS:
        raise KeyError(f"unknown IDX dataset {name!r}; known: {sorted(IDX_DATASETS)}")
    return IDX_DATASETS[key]


def identify(md5: str) -> tuple[str, str] | None:
    """(dataset name, filename) of the known file whose decompressed md5 is ``md5``."""
    for ds in IDX_DATASETS.values():
        for f in ds.files:
            if f.md5 == md5:
                return ds.name, f.filename
    return None
