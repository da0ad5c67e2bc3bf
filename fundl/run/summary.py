"""What a run reports beyond its own numbers: the published accuracy beside ours, and the
members of an ensemble or sweep (their rows in ``summary.json``, ``sweep.csv``, ``sweep.md``
and ``sweep.png``).

A member's row is built by :func:`member_row` alone, whether the members trained in one
program (their values are in the run's records) or as separate runs (in each one's summary).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

PUBLISHED = {  # reference test accuracies, for the printout beside ours (docs/reproduction.md)
    ("mnist1d", "cnn1d"): ("MNIST-1D paper (Greydanus & Kobak 2020), CNN", 0.94),
    ("mnist1d", "logistic"): ("MNIST-1D paper, logistic regression", 0.32),
    ("mnist1d", "mlp"): ("MNIST-1D paper, MLP", 0.68),
    ("mnist1d", "rnn"): ("MNIST-1D paper's recurrent baseline, a GRU", 0.91),
}

# A member's entry in summary.json: its row without the wall time.
MEMBER_KEYS = ("seed", "overrides", "test_accuracy", "test_loss", "train_accuracy", "train_loss")


def published_reference(config: dict) -> tuple[str, float] | None:
    """The published accuracy of the model family ``config`` trains, if any: an MLP
    with no hidden layer is logistic regression, not the paper's MLP."""
    kind = config["model"]["kind"]
    if kind == "mlp" and not config["model"]["hidden"]:
        kind = "logistic"
    return PUBLISHED.get((config["data"]["name"], kind))


# ------------------------------------------------------------------ members
def member_row(seed: int, overrides: dict, *, test: dict, train: dict, wall: float) -> dict:
    """One member's row: seed, overrides, the final test (``test``) and train (``train``) loss and
    accuracy, and ``wall_seconds``."""
    return {"seed": seed, "overrides": overrides, "test_accuracy": test.get("accuracy"), "test_loss": test.get("loss"),
            "train_accuracy": train.get("accuracy"), "train_loss": train.get("loss"), "wall_seconds": wall}


def one_program_rows(config: dict, members: list[dict], history: list[dict], wall: float) -> tuple[list, list]:
    """The rows of a one-program ensemble or sweep from ``fit``'s records, and each member's records."""
    rows, histories = [], []
    last = {split: next((r for r in reversed(history) if r["split"] == split), {}) for split in ("train", "eval")}
    for i, m in enumerate(members):
        train = (last["train"].get("members") or [last["train"]])[i] if last["train"] else {}
        test = (last["eval"].get("members") or [last["eval"]])[i] if last["eval"] else {}
        overrides = {k: v for k, v in m.items() if config["training"]["sweep"] or k != "training.seed"}
        rows.append(member_row(m.get("training.seed", config["training"]["seed"]), overrides, test=test, train=train,
                               wall=wall))
        histories.append([{"step": r["step"], "split": r["split"], **(r.get("members") or [r])[i]}
                          for r in history if r["split"] in ("train", "eval")])
    return rows, histories


def members_summary(config: dict, rows: list[dict], histories: list[list[dict]], history: list[dict], rd) -> dict:
    """The summary entries of a one-program ensemble (its prediction's accuracy) or sweep (the best
    member, with the reports written into the run directory ``rd``)."""
    out = {"members": [{k: r[k] for k in MEMBER_KEYS} for r in rows]}
    if config["training"]["sweep"]:
        best = write_reports(rd.path, rows, histories) if rd.writer else {"best_member": None}
        out.update(best_member=best["best_member"], test_accuracy=best.get("test_accuracy"),
                   test_loss=best.get("test_loss"))
    else:
        final = next((r for r in reversed(history) if r["split"] == "eval"), {})
        out.update(ensemble_test_accuracy=final.get("accuracy"), ensemble_test_loss=final.get("loss"))
    return out


def separate_runs_summary(rows: list[dict], histories: list[list[dict]], summaries: list[dict], rd, *,
                          config_path: str = "") -> dict:
    """The summary of a sweep whose points ran as separate runs (their ``summaries``), with the
    reports written into the run directory ``rd``."""
    best = write_reports(rd.path, rows, histories) if rd.writer else {"best_member": None}
    seconds = sum(s["train_seconds"] for s in summaries)
    return {"final_step": summaries[-1]["final_step"], "test_accuracy": best.get("test_accuracy"),
            "test_loss": best.get("test_loss"), "best_member": best["best_member"],
            "config_path": str(config_path), "separate_runs": True, "train_seconds": seconds,
            "examples_per_second": sum(s["examples_per_second"] * s["train_seconds"] for s in summaries)
            / max(seconds, 1e-9),
            "members": [{k: r[k] for k in MEMBER_KEYS} for r in rows]}


# ------------------------------------------------------------------ reports
def write_reports(run_dir: Path, rows: list[dict], histories: list[list[dict]]) -> dict:
    """``sweep.csv``, ``sweep.md`` and ``sweep.png`` in ``run_dir`` from one row per member
    (``overrides``, ``seed``, final metrics, ``wall_seconds``) and each member's train/eval records;
    returns the best row (lowest final test loss)."""
    keys = sorted({k for r in rows for k in r["overrides"]})
    metrics = ["train_loss", "train_accuracy", "test_loss", "test_accuracy", "wall_seconds"]
    table = [["member", "seed", *keys, *metrics]]
    for i, r in enumerate(rows):
        table.append([i, r["seed"], *[json.dumps(r["overrides"].get(k)) for k in keys],
                      *[r.get(m) for m in metrics]])
    buf = io.StringIO()
    csv.writer(buf).writerows(table)
    (run_dir / "sweep.csv").write_text(buf.getvalue())
    best = min(range(len(rows)), key=lambda i: _num(rows[i].get("test_loss")))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    md = ["| " + " | ".join(map(str, table[0])) + " | best |", "|" + "---|" * (len(table[0]) + 1)]
    md += ["| " + " | ".join(fmt(v) for v in row) + (" | ← |" if i == best else " | |")
           for i, row in enumerate(table[1:])]
    (run_dir / "sweep.md").write_text("\n".join(md) + "\n")
    _plot(run_dir / "sweep.png", rows, histories, best)
    return {"best_member": best, **rows[best]}


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) else float("inf")


def _plot(path: Path, rows, histories, best: int) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (row, records) in enumerate(zip(rows, histories)):
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in row["overrides"].items()) or f"seed {row['seed']}"
        style = dict(lw=2.2, zorder=3) if i == best else dict(lw=0.9, alpha=0.7)
        for ax, split in zip(axes, ("train", "eval")):
            pts = [(r["step"], r["loss"]) for r in records if r.get("split") == split
                   and isinstance(r.get("loss"), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, "-" if split == "train" else "o-", markersize=3,
                        label=label + (" (best)" if i == best else ""), **style)
    for ax, title in zip(axes, ("train loss", "test loss")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
