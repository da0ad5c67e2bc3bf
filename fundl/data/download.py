"""Explicit download of named datasets into the user cache, verified before use.

Only :func:`download` touches the network, and only when called. Each file is
streamed into a temporary file inside the target directory, its decompressed
md5 is checked, and only then is it renamed into place; a bad payload is
deleted and the next mirror tried, so the cache never holds an unverified file.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from fundl.data import catalog, paths
from fundl.data.errors import DataError, DownloadError
from fundl.data.idx import GZIP_MAGIC, md5_hex, read_bytes

_CHUNK = 1 << 16


def download(name: str, cache_dir: str | os.PathLike | None = None,
             mirrors: Sequence[str] | None = None, progress: bool = True,
             timeout: float = 60.0) -> Path:
    """Fetch dataset ``name`` (``"mnist"``, ``"fashion_mnist"``) into ``<cache_dir>/<name>/``; return that folder.

    ``mirrors`` are base URLs tried in order (default: the catalog's); file ``f``
    is fetched from ``<mirror>/<f>.gz``. Files already present and verified are
    kept. Raises :class:`DownloadError` listing every URL tried when a file
    cannot be obtained; nothing unverified is left behind.
    """
    spec = catalog.get(name)
    mirrors = tuple(mirrors) if mirrors is not None else spec.mirrors
    if not mirrors:
        raise ValueError(f"download({name!r}): expected at least one mirror URL, got none")
    target = paths.cache_dir(cache_dir) / spec.name
    created = [p for p in (target.parent, target) if not p.exists()]
    target.mkdir(parents=True, exist_ok=True)
    try:
        for f in spec.files:
            if _verified(target, f):
                continue
            _fetch(f, target, mirrors, progress, timeout)
    except BaseException:
        for p in reversed(created):  # leave no empty folders we made
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise
    return target


def _verified(target: Path, f: catalog.IdxFile) -> bool:
    for p in (target / f.filename, target / f"{f.filename}.gz"):
        if p.is_file():
            try:
                if md5_hex(read_bytes(p)) == f.md5:
                    return True
            except DataError:
                pass
    return False


def _fetch(f: catalog.IdxFile, target: Path, mirrors: Sequence[str], progress: bool, timeout: float) -> None:
    import urllib.request  # lazy: only downloads pay for it

    failures = []
    for mirror in mirrors:
        url = f"{mirror.rstrip('/')}/{f.filename}.gz"
        fd, tmp = tempfile.mkstemp(prefix=f".{f.filename}.", suffix=".part", dir=target)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                total = int(response.headers.get("Content-Length") or 0)
                _copy(response, out, url, total, progress)
            with open(tmp, "rb") as fh:
                gz = fh.read(2) == GZIP_MAGIC
            got = md5_hex(read_bytes(tmp))
            if got != f.md5:
                raise DataError(f"expected md5 {f.md5} of the decompressed bytes, got {got}")
            os.replace(tmp, target / (f"{f.filename}.gz" if gz else f.filename))
            return
        except Exception as e:  # noqa: BLE001 - every failure is reported below
            failures.append(f"  - {url}: {type(e).__name__}: {e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise DownloadError(
        f"could not obtain a verified {f.filename} into {target}. Tried:\n" + "\n".join(failures)
    )


def _copy(response, out, url: str, total: int, progress: bool) -> None:
    done = 0
    while chunk := response.read(_CHUNK):
        out.write(chunk)
        done += len(chunk)
        if progress:
            pct = f" {100 * done / total:5.1f}%" if total else ""
            print(f"\r{url}: {done / 1e6:.1f} MB{pct}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr, flush=True)
    if total and done != total:
        raise DataError(f"expected {total} bytes (Content-Length), got {done}")

