"""Run ``scripts/train.py``'s main (``fundl.run.cli.train_main``) with a fault injected; used by tests/test_faults.py.

    FUNDL_FAULT=SPEC python tests/fault_driver.py <train.py arguments>

SPEC (the process SIGKILLs itself, as a crash or the OOM killer would):

* ``step=N``          just before the dispatch that takes the state from step N to N + 1;
* ``save=N:write``    while Orbax writes checkpoint N (save() returned, its background write under way);
* ``save=N:rename``   checkpoint N complete in its temporary folder, manifest written, before Orbax's rename;
* ``save=N:renamed``  checkpoint N renamed into place, before keep-K prunes older ones;
* ``save=N:prune``    half-way through deleting a checkpoint keep-K pruned after saving N.

``FUNDL_SLOW=SECONDS`` prints ``fault_driver: step N`` to stderr and sleeps
that long before every step, so that a signal sent from outside at a random
time lands at a random, known step.

fundl must be importable (installed, or ``PYTHONPATH`` naming the checkout).
"""

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np

from fundl.train import placement
from fundl.train.checkpoint import Checkpointer, checkpoint_name
from fundl.train.checkpoint import orbax_manager

TRAIN = Path(__file__).resolve().parent.parent / "scripts" / "train.py"


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str, slow: float) -> None:
    kind, _, arg = spec.partition("=")
    kill_step, phase = None, None
    if kind == "step":
        kill_step = int(arg)
    elif kind == "save":
        n, _, phase = arg.partition(":")
        name = checkpoint_name(int(n))
    elif kind:
        raise SystemExit(f"fault_driver: unknown FUNDL_FAULT {spec!r}")

    def patch(cls):
        original = cls.compile_train

        def compile_train(self, step, steps_per_call=1, unroll=1):
            fn = original(self, step, steps_per_call, unroll)

            def wrapped(state, batch):
                now = int(np.asarray(jax.device_get(self.get_state(state).step)).reshape(-1)[0])  # ensembles: (members,)
                if slow:
                    print(f"fault_driver: step {now}", file=sys.stderr, flush=True)
                    time.sleep(slow)
                if kill_step is not None and now == kill_step:
                    die()
                return fn(state, batch)

            return wrapped

        cls.compile_train = compile_train

    if kill_step is not None or slow:
        for cls in vars(placement).values():  # every placement: one device, pmap, sharding
            if isinstance(cls, type) and hasattr(cls, "compile_train") and hasattr(cls, "get_state"):
                patch(cls)

    real_commit = Checkpointer._commit  # fundl's commit: Orbax has written every file, not yet renamed
    if phase == "write":
        real_save = Checkpointer.save

        def save(self, state, **kw):
            path = real_save(self, state, **kw)
            if path.name == name:
                die()  # Orbax's threads are writing (async: save() has returned)
            return path

        Checkpointer.save = save
    elif phase == "rename":
        def commit(self):
            real_commit(self)
            if self.pending.name == name:
                die()

        Checkpointer._commit = commit
    elif phase == "renamed":
        real_reached = orbax_manager.Manager.reached_preemption

        def reached_preemption(self, step):  # Orbax asks this between its rename and its pruning
            if step == int(n) and (Path(self.directory) / name).exists():
                die()
            return real_reached(self, step)

        orbax_manager.Manager.reached_preemption = reached_preemption
    elif phase == "prune":
        real_empty = Checkpointer._empty_trash

        def empty_trash(self):
            trash = self.directory / orbax_manager.TRASH
            if (self.directory / name).exists() and trash.is_dir() and any(trash.iterdir()):
                shutil.rmtree(next(trash.iterdir()) / "state")  # crash half-way through a deletion
                die()
            real_empty(self)

        Checkpointer._empty_trash = empty_trash


if __name__ == "__main__":
    install(os.environ.get("FUNDL_FAULT", ""), float(os.environ.get("FUNDL_SLOW", "0") or 0))
    from fundl.run.cli import train_main

    sys.argv[0] = str(TRAIN)
    sys.exit(train_main(sys.argv[1:]))
