"""Run ``scripts/train.py`` with a fault injected; used by tests/test_faults.py.

    FUNDL_FAULT=SPEC python tests/fault_driver.py <train.py arguments>

SPEC (the process SIGKILLs itself, as a crash or the OOM killer would):

* ``step=N``          just before the dispatch that takes the state from step N to N + 1;
* ``save=N:write``    while Orbax writes checkpoint N (its background write under way, nothing committed);
* ``save=N:rename``   checkpoint N complete in its temporary folder, before the rename;
* ``save=N:prune``    while deleting checkpoints beyond keep-K after saving N;
* ``enospc=N``        writing checkpoint N fails as TensorStore reports a full disk (ENOSPC; no kill).

``FUNDL_SLOW=SECONDS`` prints ``fault_driver: step N`` to stderr and sleeps
that long before every step, so that a signal sent from outside at a random
time lands at a random, known step.
"""

import os
import shutil
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fundl.train import checkpoint as ckpt  # noqa: E402
from fundl.train import placement  # noqa: E402


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str, slow: float) -> None:
    kind, _, arg = spec.partition("=")
    kill_step, phase = None, None
    if kind == "step":
        kill_step = int(arg)
    elif kind in ("save", "enospc"):
        n, _, phase = arg.partition(":")
        name = ckpt.checkpoint_name(int(n))
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

    real_wait = ckpt.Checkpointer._wait_for_orbax
    if kind == "enospc":
        def wait(self):  # Orbax's write of checkpoint N fails the way TensorStore reports a full disk
            real_wait(self)
            if self.pending is not None and self.pending.name == name:
                raise ValueError(f'DATA_LOSS: Error writing "params/w/0" in OCDBT database: Failed to write '
                                 f"4096 bytes to file 11: No space left on device [os_error_code='28']")

        ckpt.Checkpointer._wait_for_orbax = wait
    elif phase == "write":
        def wait(self):  # called while Orbax's threads write (async: training goes on meanwhile)
            if self.pending is not None and self.pending.name == name:
                die()
            real_wait(self)

        ckpt.Checkpointer._wait_for_orbax = wait
    elif phase == "rename":
        real_replace = os.replace

        def replace(src, dst, *a, **kw):
            if Path(src).name.startswith(f".{name}.tmp-") and Path(dst).name == name:
                die()
            return real_replace(src, dst, *a, **kw)

        ckpt.os.replace = replace
    elif phase == "prune":
        real_delete = ckpt._delete

        def delete(path):
            path = Path(path)
            if (path.parent / name).exists():  # crash half-way through deleting an old checkpoint
                trash = path.with_name(f".{path.name}.del-{os.getpid()}")
                os.replace(path, trash)
                shutil.rmtree(trash / "state")
                die()
            return real_delete(path)

        ckpt._delete = delete


if __name__ == "__main__":
    install(os.environ.get("FUNDL_FAULT", ""), float(os.environ.get("FUNDL_SLOW", "0") or 0))
    sys.path.insert(0, str(ROOT / "scripts"))
    import train

    sys.argv[0] = str(ROOT / "scripts" / "train.py")
    sys.exit(train.main(sys.argv[1:]))
