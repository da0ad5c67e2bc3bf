"""The Orbax ``CheckpointManager`` a :class:`~fundl.train.checkpoint.Checkpointer` saves with.

Orbax does the writing, the atomic finalize (every process writes into a
temporary folder; process 0 renames it once all are done), asynchronous saves
and keep-K pruning.  fundl configures it through public options only:

* ``post_finalization_callback``: fundl's commit (the manifest), which Orbax
  runs on process 0 after every process's write and *before* the rename; so a
  folder with its final name always has its manifest, and pruning, which
  Orbax runs after the rename, never removes the last valid checkpoint;
* ``preservation_policy``: :class:`KeepThisRunsNewest` (keep-K counts only
  this run's checkpoints older than the one being saved);
* ``todelete_subdir``: a pruned checkpoint is first renamed into a hidden
  trash folder (atomic), so a kill while deleting never leaves a half-deleted
  checkpoint;
* no preemption check of its own (:meth:`Manager.reached_preemption`).

Imported on a checkpointer's first save (importing Orbax takes a while).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import orbax.checkpoint as ocp

from fundl.train.checkpoint.manifest import PREFIX, STATE_DIR, checkpoint_name, run_id_of

TRASH = ".trash"  # Orbax's todelete_subdir: pruned checkpoints are renamed here, then deleted


class KeepThisRunsNewest:
    """Keep-K as an Orbax preservation policy: of the checkpoints older than the one being saved,
    delete all but the ``keep - 1`` newest of this run.

    "This run's" means: when the save being made records a ``run_id`` extra,
    only checkpoints whose manifest records the same one (others, and
    unreadable ones, are left alone); otherwise every older one.  Newer
    checkpoints (a run resumed before a corrupt one) are never deleted, and
    Orbax deletes only after the new checkpoint is committed.
    """

    def __init__(self, keep: int | None, directory: Path, saving: Callable[[], tuple[int, str | None] | None]):
        self.keep, self.directory, self.saving = keep, directory, saving

    def should_preserve(self, checkpoints: Sequence, *, context=None) -> list[bool]:
        saving = self.saving()
        if not self.keep or saving is None:
            return [True] * len(checkpoints)
        step, run_id = saving
        older = sorted(c.step for c in checkpoints if c.step < step)
        if run_id is not None:
            older = [s for s in older if run_id_of(self.directory / checkpoint_name(s)) == run_id]
        doomed = set(older[:max(0, len(older) - (self.keep - 1))])
        return [c.step not in doomed for c in checkpoints]


class Manager(ocp.CheckpointManager):
    """Orbax's CheckpointManager without its own preemption check.

    Orbax calls JAX's preemption sync point with the checkpoint's step; fundl's
    stop signals (:mod:`fundl.train.signals`) call the same sync point with
    their own counter, and mixing the two counters would move the step every
    process agrees to stop at.
    """

    def reached_preemption(self, step: int) -> bool:
        return False


def make_manager(directory: Path, *, keep: int | None, saving, commit: Callable[[], None]) -> Manager:
    """A manager of ``directory/step_<8 digits>/state/`` that calls ``commit`` before each rename."""
    options = ocp.CheckpointManagerOptions(
        step_name_format=ocp.step.standard_name_format(step_prefix=PREFIX.rstrip("_"), step_format_fixed_length=8),
        preservation_policy=KeepThisRunsNewest(keep, directory, saving),
        cleanup_tmp_directories=True,  # a save killed midway leaves its temporary folder: removed here
        todelete_subdir=TRASH,
        save_root_metadata=False,
        lightweight_initialize=True,  # no step metadata read: keep-K needs only the steps
        # Directories are created before save() returns (not in Orbax's background), so that a save
        # that fails leaves nothing that could appear after fundl removed its temporary folder.
        async_options=ocp.AsyncOptions(post_finalization_callback=commit, create_directories_asynchronously=False),
    )
    return Manager(directory.absolute(), options=options)


def save_args(tree: dict):
    """Orbax's arguments to save the nested ``tree`` as the step's ``state/`` item."""
    return ocp.args.Composite(**{STATE_DIR: ocp.args.StandardSave(tree)})


def temporary_folder(final: Path) -> Path:
    """The folder Orbax writes checkpoint ``final`` into before renaming it (local filesystems)."""
    return Path(ocp.path.atomicity.AtomicRenameTemporaryPath.from_final(final.absolute()).get())
