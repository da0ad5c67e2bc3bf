"""Start fundl's scripts with glibc's malloc asking for transparent huge pages.

XLA:CPU allocates each step's temporary buffer afresh and frees it after the
step.  glibc serves an allocation above 32 MiB (the ceiling of its mmap
threshold) with a fresh ``mmap``, so every step faults such a buffer in again,
page by page; with 2 MiB transparent huge pages it takes far fewer faults, and
models with large buffers (the CNNs, the character LM) train faster.  Models
whose buffers stay small (MLPs, MNIST-1D's models) do not fault and do not
change.  Measured by ``python -m benchmarks.bench_page_faults``; the figures
are in docs/benchmarks.md, "Page faults".

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
(which imports JAX, the slow part of start-up), so the re-exec costs one
interpreter start.
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
    """True when the interpreter's own command line names the script ``sys.argv[0]`` names,
    as a path (``python scripts/train.py``) or as a module (``python -m benchmarks.benchmark``).

    Not so when a script runs inside another program (IPython's ``%run``, ``runpy``
    from a notebook): re-executing would replace that program, a notebook kernel with it.
    """
    try:
        target = os.path.realpath(argv0)
        if any(os.path.realpath(a) == target for a in orig_argv[1:] if a and not a.startswith("-")):
            return True
        module = _module_run(orig_argv)
        if module is None:
            return False
        stem = os.path.join(*module.split("."))
        return target.endswith((os.sep + stem + ".py", os.sep + os.path.join(stem, "__main__.py")))
    except (OSError, ValueError, TypeError):
        return False


def _module_run(orig_argv: list[str]) -> str | None:
    """``MODULE`` of ``python [options] -m MODULE ...``, else None (a script, ``-c``, the REPL)."""
    args = orig_argv[1:]
    takes_a_value = ("-X", "-W", "--check-hash-based-pycs")
    for i, a in enumerate(args):
        if a == "-m":
            return args[i + 1] if i + 1 < len(args) else None
        if a.startswith("-m"):
            return a[2:]
        if not a.startswith("-") and (i == 0 or args[i - 1] not in takes_a_value):
            return None  # a script's path (or -c's program) comes before any -m
    return None


def reexec_with_huge_pages() -> None:
    """Replace this process by itself with the tunable set, when that helps (see the module doc)."""
    env = tuned_environ(os.environ, system=sys.platform, libc=libc_version(), thp=thp_mode())
    if env is None or not started_as_this_script(sys.argv[0], getattr(sys, "orig_argv", [])):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
