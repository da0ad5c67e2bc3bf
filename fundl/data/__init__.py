"""fundl.data: real datasets offline and verified, and a deterministic, resumable loader.

- :func:`load_dataset` — ``"mnist"``, ``"fashion_mnist"``, ``"mnist1d"``,
  ``"shakespeare"``/``"text"``, ``"synthetic"`` -> :class:`Dataset`.
- :class:`Loader` — batches by (seed, epoch), resumable position, per-process
  slices, device axis, background prefetch.
- :func:`read_idx`, :func:`write_idx` — MNIST-format files, validated.
- :func:`load_mnist1d`, :class:`CharCorpus`, :func:`~fundl.data.download.download` (explicit only).

Importing this package needs only NumPy; mnist1d, jax and urllib load on use.
"""

from fundl.data.datasets import Dataset, load_dataset
from fundl.data.download import download
from fundl.data.errors import DataError, DataNotFoundError, DownloadError
from fundl.data.idx import read_idx, write_idx
from fundl.data.loader import Loader
from fundl.data.mnist import load_idx_dataset, locate
from fundl.data.mnist1d import load_mnist1d
from fundl.data.text import CharCorpus, Vocabulary, windows

__all__ = [
    "CharCorpus", "DataError", "DataNotFoundError", "Dataset", "DownloadError", "Loader", "Vocabulary",
    "download", "load_dataset", "load_idx_dataset", "load_mnist1d", "locate", "read_idx", "windows",
    "write_idx",
]
