"""Checkpoints of a whole train state: Orbax's CheckpointManager under fundl's guarantees.

Layout of a run's ``checkpoints/`` folder (format 2)::

    step_00000100/state/         an Orbax checkpoint (StandardCheckpointHandler) of the state: a
                                 nested dict by tree path ({"params": {"dense_0": {"w": ...}}, ...}),
                                 typed PRNG keys as their key data; each process writes its shards
    step_00000100/manifest.json  format 2, step, every leaf's path/shape/dtype, extras, and the
                                 sha256 of every file under state/
    step_00000100/_CHECKPOINT_METADATA, commit_success.txt   Orbax's own step files (not needed to restore)

``state/`` is an ordinary Orbax checkpoint, so other JAX tools can read it
(``orbax.checkpoint.StandardCheckpointer().restore(path / "state")``).
Orbax's CheckpointManager writes asynchronously, finalizes atomically (a
temporary folder renamed into place once every process has written) and
prunes keep-K; fundl adds what Orbax does not promise:

* **checksums**: the manifest is written on process 0 after every process's
  write and before the rename, so a checkpoint has its manifest from the
  moment it has its name; :func:`read_manifest` (and so :func:`restore` and
  :func:`latest_valid`) verifies every file's sha256: a flipped byte, a
  truncated or a missing file makes the checkpoint invalid, and
  :func:`latest_valid` falls back to an older one with a warning;
* **extras**: the loader position, the config and the run id, in the manifest;
* **keep-K of this run only**, pruned after the new checkpoint is committed,
  by an atomic rename first: pruning never removes the last valid checkpoint,
  nor another run's (its ``run_id`` extra) or a newer one;
* **restore by tree path** into a template, with path/shape/dtype mismatches
  listed; the template's leaves may be ``jax.Array`` s or
  ``jax.ShapeDtypeStruct`` s with shardings (Orbax reshards: a checkpoint
  saved on 4 devices restores on 2), or plain arrays (restored onto the
  default device);
* a clear :class:`CheckpointWriteError` when the disk is full, naming the
  newest intact checkpoint.

A SIGKILL anywhere (inside a save too) leaves every committed checkpoint
intact and at worst a temporary folder, which the next save's manager
removes.  Format 1 (``arrays.npz`` + manifest, fundl before Orbax) still
restores (``format1.py``).

Modules of this package: ``saver`` (:class:`Checkpointer`, :func:`save`),
``orbax_manager`` (the Orbax manager's configuration and its keep-K policy),
``manifest`` (names, manifests, verification), ``reader`` (restore), ``tree`` (a
state as Orbax stores it), ``format1`` and ``errors``.
"""

from fundl.train.checkpoint.errors import CheckpointError, CheckpointWriteError
from fundl.train.checkpoint.manifest import (
    FORMAT_VERSION, checkpoint_name, latest_valid, list_checkpoints, read_manifest, step_of,
)
from fundl.train.checkpoint.reader import load_arrays, restore
from fundl.train.checkpoint.saver import Checkpointer, save
from fundl.train.checkpoint.tree import flatten_state

__all__ = [  # noqa: RUF022 (ordered by topic, as the API page shows it)
    # saving
    "Checkpointer", "save",
    # finding and reading
    "latest_valid", "list_checkpoints", "read_manifest", "restore", "load_arrays", "step_of", "checkpoint_name",
    "flatten_state", "FORMAT_VERSION",
    # errors
    "CheckpointError", "CheckpointWriteError",
]
