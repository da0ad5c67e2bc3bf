"""A run directory: resolved config, metrics.jsonl, summary.json, plots, checkpoints.

Opening one *claims* it for this run:

* a lock (``fcntl.flock`` on ``RUN_DIR/.lock``, released when the process
  ends, even by SIGKILL) keeps a second concurrent run out: it stops at once
  with :class:`RunDirInUse`, naming the holder's pid;
* ``existing="refuse"`` (a fresh run, the default) refuses a directory that
  already holds anything with :class:`RunDirNotEmpty`, which lists what is
  there and the three ways on: resume it, choose another directory, or
  overwrite — which *moves* the old run aside to ``RUN_DIR.old-<time>``,
  never deletes it; ``existing="resume"`` continues the run in it.

Only the writing process (process 0 in multi-host runs) claims and writes;
others get a ``RunDir`` with ``writer=False`` whose methods do nothing
(:func:`open_run_dir` claims for a run of a config, on every process).
The files are read back with :func:`read_metrics`, :func:`load_metrics`,
:func:`read_summary` and drawn by :func:`plot_curves`.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import time
import warnings
from pathlib import Path

from fundl.run import distributed
from fundl.run.config import ConfigError

LOCK_NAME = ".lock"
EXISTING = ("refuse", "resume", "overwrite")


class RunDirError(RuntimeError):
    """A run directory this run may not use; the message says why and what to do."""


class RunDirNotEmpty(RunDirError):
    """A fresh run was pointed at a directory that holds an earlier run."""


class RunDirInUse(RunDirError):
    """Another live process holds the run directory's lock."""


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible
    return value


class RunDir:
    """Files of one run.  ``log(record)`` appends one JSON line to metrics.jsonl.

    ``existing``: what to do with a directory that already holds a run —
    ``"refuse"`` (raise :class:`RunDirNotEmpty`), ``"resume"`` (continue it) or
    ``"overwrite"`` (move it aside to ``moved_to``).  Use it as a context
    manager, or call :meth:`close`, to release the lock early.
    """

    def __init__(self, path: str | os.PathLike, *, writer: bool = True, tensorboard: bool = False,
                 existing: str = "refuse"):
        if existing not in EXISTING:
            raise ValueError(f"RunDir: existing must be one of {EXISTING}, got {existing!r}")
        self.path = Path(path)
        self.writer = writer
        self.start = time.time()
        self.moved_to: Path | None = None
        self._tb = None
        self._lock = None
        if not writer:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise PermissionError(
                f"run directory {self.path} is not writable ({e.strerror}); choose another with --run-dir") from None
        self._lock = _acquire_lock(self.path)
        try:
            held = previous_run(self.path)
            if held and existing == "refuse":
                raise RunDirNotEmpty(_not_empty_message(self.path, held))
            if held and existing == "overwrite":
                self.moved_to = _move_aside(self.path)
            if tensorboard:
                self._tb = _tensorboard_writer(self.path / "tensorboard")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_text(self, name: str, text: str) -> None:
        """Write ``name`` whole or not at all (through ``.NAME.tmp``, removed if the write fails:
        a full disk leaves nothing behind that could block the next command)."""
        if self.writer:
            tmp = self.path / f".{name}.tmp"
            try:
                tmp.write_text(text)
                os.replace(tmp, self.path / name)
            except OSError as e:
                try:
                    tmp.unlink(missing_ok=True)
                except OSError:
                    pass
                raise OSError(e.errno, e.strerror, str(self.path / name)) from None

    def log(self, record: dict) -> None:
        if not self.writer:
            return
        record = {"wall_time": round(time.time() - self.start, 4), **{k: _jsonable(v) for k, v in record.items()}}
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: name the file (a partial last line is dropped on resume)
            raise OSError(e.errno, e.strerror, str(self.metrics_path)) from None
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch", "split", "wall_time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{record.get('split', 'train')}/{k}", v, record["step"])

    def truncate_metrics(self, after_step: int) -> None:
        """Drop logged lines past ``after_step`` (a resumed run re-logs them).

        A partial last line (a crash or a full disk mid-write) is dropped with a
        warning; an unreadable line elsewhere is kept as it is, with a warning.
        """
        if not self.writer or not self.metrics_path.exists():
            return
        keep = []
        for line, record in _parsed_lines(self.metrics_path):
            if record is None or record.get("step", 0) <= after_step:
                keep.append(line)
        self.write_text("metrics.jsonl", "".join(line + "\n" for line in keep))

    def write_summary(self, summary: dict) -> None:
        self.write_text("summary.json", json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2) + "\n")

    def close(self) -> None:
        """Flush TensorBoard and release the lock (the files stay)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None


def open_run_dir(run_dir: str | os.PathLike, config: dict, *, overwrite: bool = False) -> RunDir:
    """Claim ``run_dir`` for a run of ``config`` (process 0 claims, every process gets the verdict).

    A fresh run refuses a directory that holds an earlier run, unless
    ``overwrite`` (the old run is moved aside); ``training.resume`` continues it.
    """
    import jax

    if config["logging"]["tensorboard"]:  # this machine's packages, checked before anything is written
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise ConfigError("logging.tensorboard = true needs tensorboardX, which is not installed: "
                              "pip install tensorboardX (or fundl[dev]), or set logging.tensorboard=false") from None
    existing = "resume" if config["training"]["resume"] else "overwrite" if overwrite else "refuse"
    writer = jax.process_index() == 0
    rd, error = None, None
    if writer:
        try:
            rd = RunDir(run_dir, writer=True, tensorboard=config["logging"]["tensorboard"], existing=existing)
        except RunDirError as e:
            error = e
    message = distributed.process_zero_error(None if error is None else str(error))
    if message is not None:
        raise error if error is not None else RunDirError(f"process 0 refused the run directory: {message}")
    return rd if writer else RunDir(run_dir, writer=False)


START_UP_FILES = ("config.toml", "metrics.jsonl", "checkpoints", "tensorboard")
"""What a run writes before it has trained anything worth keeping: alone (``metrics.jsonl`` with no
record, ``checkpoints`` with no checkpoint) they hold no run, so an interrupted or failed start-up
never blocks the same command."""


def previous_run(path: str | os.PathLike) -> list[str]:
    """What ``path`` holds of an earlier run (empty: a fresh run may use it).  Hidden files (the
    lock, temporary files) do not count, nor do partial start-up files (:data:`START_UP_FILES`)
    when nothing else is there."""
    path = Path(path)
    if not path.is_dir():
        return []
    names = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    if all(n in START_UP_FILES and _holds_nothing(path / n) for n in names):
        return []
    return names


def _holds_nothing(p: Path) -> bool:
    """A start-up file with nothing of a run in it: config.toml, an empty metrics.jsonl, a
    folder with no (visible) file."""
    if p.name == "config.toml":
        return True
    if p.is_dir():
        return not any(q.is_file() and not q.name.startswith(".") for q in p.rglob("*"))
    return p.is_file() and not p.read_text(errors="replace").strip()


def _acquire_lock(path: Path):
    """Hold an exclusive flock on ``path/.lock`` (released when the file closes or the process ends)."""
    f = open(path / LOCK_NAME, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "an unknown process"
        f.close()
        raise RunDirInUse(
            f"run directory {path} is in use by another run ({holder}); wait for it to finish, stop it, "
            f"or choose another directory with --run-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def _describe(path: Path, names: list[str]) -> str:
    parts = []
    steps = sorted(int(p.name[5:]) for p in (path / "checkpoints").glob("step_*") if p.name[5:].isdigit()) \
        if "checkpoints" in names else []
    if steps:
        parts.append(f"{len(steps)} checkpoint(s), steps {steps[0]}..{steps[-1]}")
    if "metrics.jsonl" in names:
        lines = sum(1 for line in (path / "metrics.jsonl").read_text(errors="replace").splitlines() if line.strip())
        parts.append(f"metrics.jsonl with {lines} records")
    if "summary.json" in names:
        parts.append("summary.json (a finished run)")
    others = [n for n in names if n not in ("checkpoints", "metrics.jsonl", "summary.json")]
    if others:
        parts.append(", ".join(others[:6]) + (f" and {len(others) - 6} more" if len(others) > 6 else ""))
    return "; ".join(parts)


def _not_empty_message(path: Path, names: list[str]) -> str:
    return (f"run directory {path} already holds a run ({_describe(path, names)}); a fresh run will not "
            f"write into it.\nchoose one: --resume {path} (continue that run from its newest checkpoint), "
            f"--run-dir NEW_DIR (start this run somewhere else), or --overwrite (move the old run aside to "
            f"{path.name}.old-<time> and start afresh here)")


def _move_aside(path: Path) -> Path:
    """Move everything but the lock into a new sibling ``<name>.old-<UTC time>``; return it."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.old-{stamp}-{n}")
    aside.mkdir()
    for name in previous_run(path):
        os.replace(path / name, aside / name)
    return aside


def _parsed_lines(path: Path):
    """``(line, record or None)`` for the non-empty lines of a metrics file (see truncate_metrics)."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            last = i == len(lines) - 1
            warnings.warn(f"{path}, line {i + 1}: not a JSON record ({line[:60]!r}); "
                          + ("a partial last write, dropped" if last else "kept as it is"), stacklevel=3)
            if last:
                continue
            record = None
        yield line, record


def _tensorboard_writer(path: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ImportError("logging.tensorboard = true needs tensorboardX: pip install tensorboardX") from None
    return SummaryWriter(str(path))


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` as a list of dicts (unreadable lines skipped with a warning)."""
    return [r for _, r in _parsed_lines(Path(run_dir) / "metrics.jsonl") if r is not None]


def read_summary(run_dir: str | os.PathLike) -> dict:
    """``run_dir/summary.json`` (a finished run's final numbers) as a dict."""
    return json.loads((Path(run_dir) / "summary.json").read_text())


def load_metrics(run_dir: str | os.PathLike):
    """``metrics.jsonl`` as a pandas DataFrame (needs pandas: ``pip install pandas``)."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("load_metrics needs pandas (pip install pandas); read_metrics returns plain dicts") from None
    return pd.DataFrame.from_records(read_metrics(run_dir))


def plot_curves(run_dir: str | os.PathLike, filename: str = "curves.png") -> Path:
    """Loss and accuracy, train and eval, against step -> ``run_dir/curves.png``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    metrics = [m for m in ("loss", "accuracy") if any(m in r for r in records)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for split, style in (("train", "-"), ("eval", "o-")):
            pts = [(r["step"], r[metric]) for r in records
                   if r.get("split") == split and isinstance(r.get(metric), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=split, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = Path(run_dir) / filename
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
