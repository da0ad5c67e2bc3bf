"""What the whole test suite shares: the repository root, a no-network fixture, the ``slow``
marker and one JAX compilation cache per test session.

- ``ROOT``: the repository root (tests import it: ``from conftest import ROOT``).
- ``no_network``: any connection attempt fails the test (local data must never download).
- ``@pytest.mark.slow`` (registered in pyproject.toml): tests of more than a second or two, such as whole
  runs through the command line, several processes, notebooks or the site build.
  ``make test-fast`` deselects them; ``make test`` runs everything, slow tests first.
- The session's JAX compilation cache: one temporary directory, set through
  ``JAX_COMPILATION_CACHE_DIR`` before JAX is imported, so the xdist workers and every process
  the tests start (the command line, multi-process runs, notebooks) reuse each other's compiled
  programs instead of compiling them again. It is removed at the end of the session; a cache
  directory already set in the environment is used as it is.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_CACHE_OWNER = "FUNDL_TEST_COMPILATION_CACHE_OWNER"  # the pid of the process that made the cache


def pytest_configure(config):
    """Before any test module (and so JAX) is imported; inherited by xdist workers and subprocesses."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fundl-tests-jax-cache-")
        os.environ[_CACHE_OWNER] = str(os.getpid())
    # Cache every program, however quick to compile: the suite compiles thousands of small ones.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    # No size bound: with one, JAX locks the folder and scans every entry on each write (eviction),
    # which serialised the workers and slowed the suite down several times over (docs/benchmarks.md).
    _check_loadgroup(config)


def pytest_collection_modifyitems(config, items):
    """Slow tests first (a stable sort, so each file keeps its order): under xdist the long ones
    start early instead of leaving one worker busy at the end while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _check_loadgroup(config) -> None:
    """``--dist loadgroup`` (``make test``) keeps each ``xdist_group`` on one worker by putting the
    group in each test's id; pytest 9.2 ignores pytest-xdist 3.8's way of doing so (pytest-xdist#1386),
    so every module-scoped run is made once per worker and the suite runs far longer, silently."""
    if config.getoption("dist", "no") != "loadgroup":
        return
    from importlib.metadata import version

    numbers = lambda name: tuple(int(p) for p in version(name).split(".")[:2] if p.isdigit())  # noqa: E731
    if numbers("pytest") >= (9, 2) and numbers("pytest-xdist") <= (3, 8):
        raise pytest.UsageError(f"--dist loadgroup does not group tests with pytest {version('pytest')} and "
                                f"pytest-xdist {version('pytest-xdist')} (pytest-xdist#1386): install the "
                                f"versions pyproject.toml names: pip install -e '.[dev]'")


def pytest_unconfigure(config):
    if os.environ.get(_CACHE_OWNER) == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def spy_platform_default(monkeypatch, module) -> dict:
    """Record the ``default`` branch (what every platform but CPU lowers) that ``module`` hands to
    ``lax.platform_dependent``: after a trace, ``seen["default"]`` is that function."""
    seen = {}
    real = module.lax.platform_dependent

    def spy(*args, cpu, default):
        seen["default"] = default
        return real(*args, cpu=cpu, default=default)

    monkeypatch.setattr(module.lax, "platform_dependent", spy)
    return seen


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("this test must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
