"""Start fundl's scripts with glibc's malloc asking for transparent huge pages.

XLA:CPU allocates each step's temporary buffer afresh and frees it after the
step (59 MiB for the benchmark CNN at batch 128).  glibc serves an allocation
above 32 MiB with a fresh ``mmap``, so every step touches it page by page
again: 12,650 minor page faults per step for that CNN with 4 KiB pages,
380-390 with 2 MiB transparent huge pages (``scripts/bench_page_faults.py``).
On the 2-core machine of docs/benchmarks.md that is 1.2x the CNN's steps/s,
1.13-1.34x ``scripts/train.py`` on ``configs/mnist_cnn.toml`` and 1.15x on
``shakespeare_char_lm`` (an LSTM with large buffers).  Models whose buffers
stay small (MLPs, MNIST-1D's models, the benchmark LSTM) do not fault and do
not change.

glibc reads its tunables only when a process starts, so a script that wants
them re-executes itself (same pid, same arguments) with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` before importing JAX.  It does so
only where that changes something: Linux with glibc >= 2.35 (the first with
the tunable) and transparent huge pages in ``madvise`` mode (in ``always``
mode the kernel gives large mappings huge pages without being asked; in
``never`` mode it gives none).
``FUNDL_HUGEPAGES=0`` turns it off.  A script run inside another program
(IPython's ``%run``) never re-executes: that would replace the program.  Your
own scripts get the same by starting
with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` in the environment.

This file imports nothing heavy on purpose: it runs before ``import fundl``
(which imports JAX, ~1 s), so the re-exec costs one interpreter start.
"""

from __future__ import annotations

import os
import re
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_SETTING) -> str | None:
    """The bracketed choice of the kernel's transparent-huge-page setting, or None if unreadable."""
    try:
        with open(path) as f:
            m = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return m.group(1) if m else None


def tuned_environ(environ, *, system: str, libc: tuple[str, str], thp: str | None) -> dict | None:
    """The environment to re-execute with, or None when re-executing would change nothing."""
    if environ.get("FUNDL_HUGEPAGES", "1") == "0" or system != "linux" or thp != "madvise":
        return None
    name, version = libc
    try:
        if name != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
            return None
    except ValueError:
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:  # set already (by us before the exec, or by the user)
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    return env


def libc_version() -> tuple[str, str]:
    """("glibc", "2.36") from the C library itself; ("", "") where it does not say (musl, macOS)."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    except (ValueError, OSError, AttributeError):
        return "", ""
    return name, version


def started_as_this_script(argv0: str, orig_argv: list[str]) -> bool:
    """True when the interpreter's own command line names the script ``sys.argv[0]`` names.

    Not so when a script runs inside another program (IPython's ``%run``, ``runpy``
    from a notebook): re-executing would replace that program, a notebook kernel with it.
    """
    try:
        target = os.path.realpath(argv0)
        return any(os.path.realpath(a) == target for a in orig_argv[1:] if a and not a.startswith("-"))
    except (OSError, ValueError, TypeError):
        return False


def reexec_with_huge_pages() -> None:
    """Replace this process by itself with the tunable set, when that helps (see the module doc)."""
    env = tuned_environ(os.environ, system=sys.platform, libc=libc_version(), thp=thp_mode())
    if env is None or not started_as_this_script(sys.argv[0], getattr(sys, "orig_argv", [])):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
