"""Where fundl looks for data and keeps its cache.

Two environment variables steer everything, so CI and clusters need no code:
``FUNDL_DATA_DIR`` (read-only data the user already has) and
``FUNDL_CACHE_DIR`` (where :func:`fundl.data.download` and the optional
MNIST-1D cache write). Nothing here touches the network or writes anything.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "FUNDL_DATA_DIR"
CACHE_DIR_ENV = "FUNDL_CACHE_DIR"


def cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The user cache directory: the argument, else ``$FUNDL_CACHE_DIR``, else ``~/.cache/fundl``.

    ``$XDG_CACHE_HOME`` replaces ``~/.cache`` when set. The directory is not created.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fundl"


def data_dir_from_env() -> Path | None:
    """``$FUNDL_DATA_DIR`` as a path (relative paths resolve against the working directory)."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else None


def candidate_dirs(
    aliases: tuple[str, ...],
    data_dir: str | os.PathLike | None,
    cache: str | os.PathLike | None,
    system_dirs: tuple[str, ...],
) -> list[tuple[str, Path]]:
    """Directories to search for one dataset, in priority order, labelled by origin.

    An explicit ``data_dir`` and ``$FUNDL_DATA_DIR`` may hold the files directly or
    hold one sub-folder per dataset (``mnist/``, ``fashion-mnist/``...); both are
    tried. The cache holds one sub-folder per dataset. System locations come last.
    """
    out: list[tuple[str, Path]] = []

    def root(origin: str, base: Path, direct: bool) -> None:
        if direct:
            out.append((origin, base))
        out.extend((origin, base / a) for a in aliases)

    if data_dir is not None:
        root("data_dir argument", Path(data_dir).expanduser(), True)
    env = data_dir_from_env()
    if env is not None:
        root(f"${DATA_DIR_ENV}", env, True)
    root("user cache", cache_dir(cache), False)
    out.extend(("system location", Path(d)) for d in system_dirs)
    seen, unique = set(), []
    for origin, path in out:
        if path not in seen:
            seen.add(path)
            unique.append((origin, path))
    return unique
