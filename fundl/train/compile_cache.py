"""The persistent compilation cache: programs compiled once are kept on disk for later processes.

Research runs are short and repeated, so compile time is much of what one waits for.
:func:`enable_compilation_cache` points JAX's persistent compilation cache at
``<cache>/compilation/``, where ``<cache>`` is the user cache of ``fundl.data.paths``
(``$FUNDL_CACHE_DIR``, else ``$XDG_CACHE_HOME/fundl``, else ``~/.cache/fundl``): never the
repository or a run directory.  ``fit``, ``evaluate`` and the command-line entry points call it,
so it is on by default; a second run of the same config loads its programs instead of
compiling them.

- ``FUNDL_COMPILATION_CACHE=0`` (or ``false``/``off``/``no``) turns it off: nothing is written.
- A user's own JAX setting wins: with ``JAX_COMPILATION_CACHE_DIR`` or
  ``jax.config.jax_compilation_cache_dir`` already set, or JAX's cache switched off
  (``jax_enable_compilation_cache``), nothing is changed.
- Programs are kept per kind of host CPU (a subfolder named for its model and instruction-set
  flags): JAX's cache key names no CPU features, and XLA:CPU compiles for the host's, so a
  home folder shared by different machines must not hand one machine another's code.
- Several processes may share it (pytest-xdist workers, the processes of one run): the
  cache is given a size bound (:data:`MAX_BYTES`), under which JAX takes a file lock around
  every read and write (``filelock``) and evicts the least recently used entries, so no
  process reads an entry another is still writing.  In a multi-process run only process 0
  writes (JAX's rule); the others read.

How large it grows and how to clear it: docs/training.md, "Compilation cache".
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import jax

from fundl.data import paths

SWITCH_ENV = "FUNDL_COMPILATION_CACHE"
"""Set to ``0`` (``false``, ``off``, ``no``) to keep fundl from enabling the cache."""

SUBDIR = "compilation"
"""The cache's folder inside the user cache (``fundl.data.paths.cache_dir``)."""

MAX_BYTES = 2 * 2**30
"""The cache's bound on disk: beyond it the least recently used entries are evicted.  Any bound
also makes JAX lock the folder around reads and writes (safe sharing between processes)."""

# Loading a cached program is quicker than compiling even the smallest one, and a small model's
# step compiles in under JAX's default threshold (1 s), so every program is kept.
# Figures: docs/benchmarks.md, "First step".
MIN_COMPILE_SECONDS = 0.0
"""Programs that compile faster than this are not written (JAX's ``persistent_cache_min_compile_time_secs``)."""

_OFF = ("0", "false", "off", "no")
_enabled: Path | None = None  # the folder this process's enable_compilation_cache set


def compilation_cache_dir() -> Path:
    """Where fundl's compilation cache lives (whether or not it is enabled): ``<cache>/compilation``."""
    return paths.cache_dir() / SUBDIR


def host_folder() -> str:
    """The subfolder for this host's kind of CPU: the machine and a hash of the CPU's model and
    instruction-set flags (``/proc/cpuinfo``; elsewhere what ``platform`` says)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = {line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))}
        text = "".join(sorted(lines))
    except OSError:
        text = platform.processor()
    return f"{platform.machine() or 'cpu'}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def enabled_by_user() -> bool:
    """True when ``FUNDL_COMPILATION_CACHE`` does not turn the cache off."""
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in _OFF


def enable_compilation_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache in :func:`compilation_cache_dir` (its
    :func:`host_folder`), unless the user switched it off or set JAX's own; the folder in use,
    or None when fundl left it off.

    Idempotent and cheap (it runs at every ``fit``); call it before the first compile so that
    every program of the process is cached.  The folder is created when first needed.
    """
    if not jax.config.jax_enable_compilation_cache:
        return None
    global _enabled
    own = jax.config.jax_compilation_cache_dir
    if own:  # the user's (or an earlier call's) setting wins
        return _enabled if own == str(_enabled) else None
    if not enabled_by_user():
        return None
    folder = compilation_cache_dir() / host_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: compile as before
        return None
    if _has_filelock() and "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:  # a bound needs filelock
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    _enabled = folder
    return folder


def _has_filelock() -> bool:
    try:
        import filelock  # noqa: F401
    except ImportError:
        return False
    return True
