"""What makes a checkpoint folder valid: its name, and a manifest with the sha256 of every file.

A checkpoint is ``step_<8 digits>/`` holding ``manifest.json`` (format, step,
every leaf's path/shape/dtype, the caller's extras, and ``files``: the sha256
of every file under ``state/``).  The manifest is written last, inside the
temporary folder, before that folder is renamed into place; so a folder with
a valid name and a manifest whose checksums verify is a complete checkpoint,
and anything else (a flipped byte, a truncated or missing file, no manifest)
is not, and :func:`latest_valid` falls back to an older one.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

from fundl.train.checkpoint import format1
from fundl.train.checkpoint.errors import CheckpointError

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
PREFIX = "step_"
STATE_DIR = "state"  # format 2: the Orbax checkpoint inside a step folder
MANIFEST = "manifest.json"


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint of ``step``: ``step_00000100``."""
    return f"{PREFIX}{int(step):08d}"


def step_of(path: str | Path) -> int:
    """The step of checkpoint folder ``path`` (from its name)."""
    return int(Path(path).name[len(PREFIX):])


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint folders by name, oldest first (temporary and hidden folders excluded; not verified)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=step_of)


# ------------------------------------------------------------------- writing
def file_sha256(path: Path, *, fsync: bool = False) -> str:
    """The sha256 of file ``path``; with ``fsync``, also flush it to disk."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (renames, new files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_manifest(folder: Path, manifest: dict) -> None:
    """Hash and fsync every file under ``folder/state/``, then write ``folder/manifest.json``.

    Called on the not yet renamed (temporary) folder once every process's
    writes are done, so the manifest exists exactly when the folder has its
    final name.
    """
    state = folder / STATE_DIR
    if not state.is_dir():
        raise FileNotFoundError(2, f"Orbax left no {state}")
    files = sorted(f for f in state.rglob("*") if f.is_file())
    digests = {f.relative_to(folder).as_posix(): file_sha256(f, fsync=True) for f in files}
    for d in sorted({state, *(f.parent for f in files)}, key=lambda p: -len(p.parts)):
        fsync_dir(d)
    write_json_atomic(folder / MANIFEST, {**manifest, "files": digests})


# ------------------------------------------------------------------- reading
def read_manifest(path: str | Path, *, verify: bool = True) -> dict:
    """The manifest of checkpoint ``path``; with ``verify``, check every data file's sha256."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        if (path / STATE_DIR).is_dir():
            raise CheckpointError(
                f"checkpoint {path} has no {MANIFEST}: its {STATE_DIR}/ folder (an Orbax checkpoint) was "
                f"never committed by fundl (a save that did not finish, or a folder written by another "
                f"tool). fundl restores only committed checkpoints; read it with "
                f"orbax.checkpoint.StandardCheckpointer().restore({str(path / STATE_DIR)!r}) and save it "
                f"again with fundl.train.checkpoint.save") from None
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST} (incomplete or not a checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt ({e})") from None
    if not isinstance(manifest, dict) or "leaves" not in manifest:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} lacks 'leaves'")
    fmt = manifest.get("format", 1)
    if fmt not in READABLE_FORMATS:
        raise CheckpointError(
            f"checkpoint {path} has format {fmt!r}; this fundl reads formats 1 ({format1.ARRAYS}) and 2 "
            f"(an Orbax {STATE_DIR}/ folder). It was written by a newer fundl: upgrade fundl to read it")
    if fmt == 1:
        files = format1.manifest_files(path, manifest)
    elif isinstance(manifest.get("files"), dict):
        files = manifest["files"]
    else:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} (format 2) lacks 'files'")
    if verify:
        if not files:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} lists no files")
        for name, digest in files.items():
            _verify(path, name, digest)
    return manifest


def _verify(path: Path, name: str, digest: str) -> None:
    f = path / name
    if not f.is_file():
        raise CheckpointError(f"checkpoint {path} has no {name}")
    got = file_sha256(f)
    if got != digest:
        raise CheckpointError(
            f"checkpoint {f} is corrupt: sha256 {got[:16]}... but the manifest "
            f"recorded {digest[:16]}... (truncated or modified file)")


def run_id_of(path: Path):
    """The ``run_id`` extra of checkpoint ``path``; None when unrecorded or unreadable."""
    try:
        return read_manifest(path, verify=False).get("extras", {}).get("run_id")
    except CheckpointError:
        return None


def latest_valid(directory: str | Path) -> Path | None:
    """The newest checkpoint whose manifest and checksums verify.

    Corrupt newer ones are skipped with a warning naming them.  None if the
    folder holds no checkpoint; CheckpointError if it holds only corrupt ones.
    """
    errors = []
    for path in reversed(list_checkpoints(directory)):
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
