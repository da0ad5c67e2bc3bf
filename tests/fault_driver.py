"""Run ``scripts/train.py`` with a fault injected; used by tests/test_faults.py.

    FUNDL_FAULT=SPEC python tests/fault_driver.py <train.py arguments>

SPEC (the process SIGKILLs itself, as a crash or the OOM killer would):

* ``step=N``          just before the dispatch that takes the state from step N to N + 1;
* ``save=N:npz``      while writing arrays.npz of checkpoint N (half the bytes written);
* ``save=N:rename``   checkpoint N complete in its temporary folder, before the rename;
* ``save=N:prune``    while deleting checkpoints beyond keep-K after saving N;
* ``enospc=N``        writing checkpoint N fails with OSError(ENOSPC) (disk full; no kill).

``FUNDL_SLOW=SECONDS`` prints ``fault_driver: step N`` to stderr and sleeps
that long before every step, so that a signal sent from outside at a random
time lands at a random, known step.
"""

import errno
import io
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fundl.train import checkpoint as ckpt  # noqa: E402
from fundl.train import parallel  # noqa: E402


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
        for cls in vars(parallel).values():  # every placement: one device, pmap, sharding
            if isinstance(cls, type) and hasattr(cls, "compile_train") and hasattr(cls, "get_state"):
                patch(cls)

    if kind == "enospc":
        real_savez = np.savez

        def savez(file, *args, **kw):
            if int(kw.get("step", -1)) == int(arg):
                file.write(b"x" * 100)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_savez(file, *args, **kw)

        ckpt.np.savez = savez
    elif phase == "npz":
        real_savez = np.savez

        def savez(file, *args, **kw):
            if int(kw.get("step", -1)) == int(arg.split(":")[0]):
                buf = io.BytesIO()
                real_savez(buf, *args, **kw)
                data = buf.getvalue()
                file.write(data[: len(data) // 2])
                file.flush()
                os.fsync(file.fileno())
                die()
            return real_savez(file, *args, **kw)

        ckpt.np.savez = savez
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
                (trash / "arrays.npz").unlink()
                die()
            return real_delete(path)

        ckpt._delete = delete


if __name__ == "__main__":
    install(os.environ.get("FUNDL_FAULT", ""), float(os.environ.get("FUNDL_SLOW", "0") or 0))
    sys.path.insert(0, str(ROOT / "scripts"))
    import train

    sys.argv[0] = str(ROOT / "scripts" / "train.py")
    sys.exit(train.main(sys.argv[1:]))
