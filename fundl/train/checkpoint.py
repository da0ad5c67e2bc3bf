"""Checkpoints of a whole train state: atomic, checksummed, restored by tree path.

Layout of a run's ``checkpoints/`` folder::

    step_00000100/arrays.npz     every leaf, keyed by its tree path
    step_00000100/manifest.json  step, paths, shapes, dtypes, sha256 of arrays.npz, extras

A checkpoint is written into a temporary folder, fsynced and renamed into
place, so a crash mid-save never leaves a half-written ``step_*`` folder and
never touches an older one.  There is no ``latest`` pointer: the newest
``step_*`` folder whose checksum verifies is the one to restore
(:func:`latest_valid`), so no second file can disagree with the folders.
Restoring verifies the checksum, then fills a *template* state (built the
usual way) leaf by leaf by tree path, checking shape and dtype; mismatches
are listed path by path.  The format is NumPy's
``.npz`` (no pickle) plus JSON.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fundl.train.state import is_prng_key

FORMAT_VERSION = 1
_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names its path and why."""


class CheckpointWriteError(OSError):
    """Saving a checkpoint failed (disk full, permissions, ...).

    Raised by :func:`save` with the errno of the underlying OSError; the
    message names the checkpoint, the reason and the newest intact one.  The
    temporary folder has been removed and older checkpoints are untouched.
    """


def _path_str(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def flatten_state(state) -> dict[str, np.ndarray]:
    """``{tree path: numpy array}``; typed PRNG keys become their key data."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if is_prng_key(leaf):
            leaf = jax.random.key_data(leaf)
        out[_path_str(path)] = np.asarray(jax.device_get(leaf))
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{int(step):08d}"


def step_of(path: str | Path) -> int:
    """The step of checkpoint folder ``path`` (from its name)."""
    return int(Path(path).name[len(_PREFIX):])


def save(directory: str | Path, state, *, step: int | None = None, extras: dict | None = None,
         keep: int | None = None) -> Path:
    """Write ``state`` as ``directory/step_<step>`` atomically; return its path.

    ``extras`` is any JSON-serialisable dict (loader position, config hash).
    ``keep`` = K deletes all but the K newest checkpoints afterwards.
    """
    directory = Path(directory)
    arrays = flatten_state(state)
    step = int(np.asarray(arrays.get("step", step))) if step is None else int(step)
    final = directory / checkpoint_name(step)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _remove_stale(directory)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        with open(tmp / "arrays.npz", "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "sha256": _sha256(tmp / "arrays.npz"),
            "leaves": {p: {"shape": list(a.shape), "dtype": str(a.dtype)} for p, a in arrays.items()},
            "extras": extras or {},
        }
        _write_atomic_text(tmp / "manifest.json", json.dumps(manifest, indent=1))
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step: replace the old copy last
            old = directory / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(directory)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        intact = list_checkpoints(directory)
        newest = f"the newest intact checkpoint is {intact[-1]}" if intact else "no earlier checkpoint exists"
        reason = e.strerror or str(e)
        hint = " Free some disk space or choose another run directory." if e.errno == errno.ENOSPC else ""
        raise CheckpointWriteError(
            e.errno, f"could not write checkpoint {final}: {reason}. The partial copy was removed and "
                     f"earlier checkpoints are untouched; {newest}.{hint}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep:
        prune(directory, final, keep)
    return final


def prune(directory: str | Path, newest: Path, keep: int) -> list[Path]:
    """Delete this run's checkpoints older than ``newest`` beyond the ``keep`` newest; return them.

    "This run's" means: a step below ``newest``'s and, when ``newest``'s manifest
    records a ``run_id`` extra, the same ``run_id``.  So pruning never deletes
    the checkpoint just written, a newer one, or another run's.
    """
    step = step_of(newest)
    run_id = read_manifest(newest, verify=False).get("extras", {}).get("run_id")
    ours = [p for p in list_checkpoints(directory) if step_of(p) < step]
    if run_id is not None:
        ours = [p for p in ours if _run_id_of(p) == run_id]
    doomed = ours[:max(0, len(ours) - (keep - 1))]
    for old in doomed:
        _delete(old)
    return doomed


def _run_id_of(path: Path):
    try:
        return read_manifest(path, verify=False).get("extras", {}).get("run_id")
    except CheckpointError:
        return None  # incomplete or corrupt: not known to be this run's, left alone


def _delete(path: Path) -> None:
    """Remove a checkpoint folder: first renamed out of sight (atomic), then deleted."""
    trash = path.with_name(f".{path.name}.del-{os.getpid()}")
    try:
        os.replace(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _remove_stale(directory: Path) -> None:
    """Delete leftovers of saves that died midway (``.step_*.tmp-*``, ``.old-*``, ``.del-*``).

    Each name ends with the pid of the process that made it; folders of a
    live process other than this one are left alone (a run directory's lock
    already keeps a second run out, this guards direct callers of ``save``).
    A ``.old-*`` folder is renamed back when its step folder is missing (a
    crash between the two renames of a same-step re-save).
    """
    for p in directory.iterdir():
        name = p.name
        if not name.startswith("." + _PREFIX):
            continue
        base, _, kind = name[1:].rpartition(".")
        pid = kind.partition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        if kind.startswith("old-") and not (directory / base).exists():
            try:
                os.replace(p, directory / base)
                continue
            except OSError:
                pass
        if kind.startswith(("tmp-", "old-", "del-")):
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary folders excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
             and p.name[len(_PREFIX):].isdigit()]
    return sorted(found, key=step_of)


def read_manifest(path: str | Path, *, verify: bool = True) -> dict:
    """The manifest of checkpoint ``path``; with ``verify``, check the content hash."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no manifest.json (incomplete or not a checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: manifest.json is corrupt ({e})") from None
    if not isinstance(manifest, dict) or "sha256" not in manifest or "leaves" not in manifest:
        raise CheckpointError(f"checkpoint {path}: manifest.json lacks 'sha256'/'leaves'")
    if verify:
        arrays = path / "arrays.npz"
        if not arrays.is_file():
            raise CheckpointError(f"checkpoint {path} has no arrays.npz")
        digest = _sha256(arrays)
        if digest != manifest["sha256"]:
            raise CheckpointError(
                f"checkpoint {arrays} is corrupt: sha256 {digest[:16]}... but the manifest "
                f"recorded {manifest['sha256'][:16]}... (truncated or modified file)")
    return manifest


def _describe_mismatches(expected: dict, got: dict, limit: int = 5) -> str:
    lines = []
    for p in list(expected) + [p for p in got if p not in expected]:  # the template's order: params first
        e, g = expected.get(p), got.get(p)
        if e == g:
            continue
        if e is None:
            lines.append(f"  {p}: in the checkpoint, not in the model's state {g}")
        elif g is None:
            lines.append(f"  {p}: expected {e}, missing from the checkpoint")
        else:
            lines.append(f"  {p}: expected {e}, checkpoint has {g}")
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


def restore(path: str | Path, template) -> tuple[Any, dict]:
    """Fill ``template`` (a state of the right structure) from checkpoint ``path``.

    Returns ``(state, manifest)``.  Raises CheckpointError on a checksum
    failure or when paths, shapes or dtypes differ from the template.
    """
    path = Path(path)
    manifest = read_manifest(path, verify=True)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    expected = {}
    for p, leaf in leaves:
        data = jax.random.key_data(leaf) if is_prng_key(leaf) else leaf
        expected[_path_str(p)] = (tuple(np.shape(data)), str(jnp.result_type(data)))
    got = {p: (tuple(v["shape"]), v["dtype"]) for p, v in manifest["leaves"].items()}
    if expected != got:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model/optimiser state:\n{_describe_mismatches(expected, got)}")
    try:
        with np.load(path / "arrays.npz", allow_pickle=False) as data:
            values = []
            for p, leaf in leaves:
                arr = data[_path_str(p)]
                if is_prng_key(leaf):
                    arr = jax.random.wrap_key_data(arr, impl=jax.random.key_impl(leaf))
                values.append(arr)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read arrays.npz ({e})") from None
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(v) if not is_prng_key(v) else v for v in values]), manifest


def latest_valid(directory: str | Path) -> Path | None:
    """The newest checkpoint whose manifest and checksum verify.

    Corrupt newer ones are skipped with a warning naming them.  None if the
    folder holds no checkpoint; CheckpointError if it holds only corrupt ones.
    """
    candidates = list_checkpoints(directory)
    errors = []
    for path in reversed(candidates):
        try:
            read_manifest(path, verify=True)
        except CheckpointError as e:
            warnings.warn(f"skipping corrupt checkpoint: {e}", stacklevel=2)
            errors.append(str(e))
            continue
        return path
    if errors:
        raise CheckpointError(
            f"no valid checkpoint in {directory}; every one failed verification:\n  " + "\n  ".join(errors))
    return None
