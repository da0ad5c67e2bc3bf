"""A run directory: resolved config, metrics.jsonl, summary.json, plots, checkpoints.

Only the writing process (process 0 in multi-host runs) writes; others get a
``RunDir`` with ``writer=False`` whose methods do nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible
    return value


class RunDir:
    """Files of one run.  ``log(record)`` appends one JSON line to metrics.jsonl."""

    def __init__(self, path: str | os.PathLike, *, writer: bool = True, tensorboard: bool = False):
        self.path = Path(path)
        self.writer = writer
        self.start = time.time()
        self._tb = None
        if writer:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                probe = self.path / f".write-test-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                raise PermissionError(
                    f"run directory {self.path} is not writable ({e.strerror}); choose another with --run-dir") from None
            if tensorboard:
                self._tb = _tensorboard_writer(self.path / "tensorboard")

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_text(self, name: str, text: str) -> None:
        if self.writer:
            tmp = self.path / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.path / name)

    def log(self, record: dict) -> None:
        if not self.writer:
            return
        record = {"wall_time": round(time.time() - self.start, 4), **{k: _jsonable(v) for k, v in record.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch", "split", "wall_time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{record.get('split', 'train')}/{k}", v, record["step"])

    def truncate_metrics(self, after_step: int) -> None:
        """Drop logged lines past ``after_step`` (a resumed run re-logs them)."""
        if not self.writer or not self.metrics_path.exists():
            return
        keep = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= after_step]
        self.write_text("metrics.jsonl", "".join(line + "\n" for line in keep))

    def write_summary(self, summary: dict) -> None:
        self.write_text("summary.json", json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(path: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ImportError("logging.tensorboard = true needs tensorboardX: pip install tensorboardX") from None
    return SummaryWriter(str(path))


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` as a list of dicts."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


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
