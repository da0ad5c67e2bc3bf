"""The two errors of checkpointing: a checkpoint that cannot be used, and one that could not be written."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names its path and why."""


class CheckpointWriteError(OSError):
    """Saving a checkpoint failed (disk full, permissions, ...).

    Raised by :meth:`~fundl.train.checkpoint.Checkpointer.save` /
    :meth:`~fundl.train.checkpoint.Checkpointer.wait` with the errno of the
    underlying error; the message names the checkpoint, the reason and the
    newest intact one.  The partial copy has been removed and older
    checkpoints are untouched.
    """
