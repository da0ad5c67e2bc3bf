"""Ensembles and sweeps from a config: who the members are, how they run, what they report.

``training.ensemble = N`` trains N members, member ``i`` with seed ``seed + i``.
``training.sweep`` (``--sweep KEY=V1,V2,...`` on the command line, repeatable)
trains one member per point of the cartesian product of the values.  Seeds
and the optimiser settings the optimiser state can hold
(``fundl.train.optim.injectable``: the learning rate, and the weight decay of
optimisers that take it) vary *inside one compiled program* — a vmapped train
state (``fundl.train.ensemble``); any other swept setting (a width, the batch
size, the model kind, a schedule) changes shapes or structure, so then every
point runs as a separate run in ``RUN_DIR/members/<k>/``.  Either way the run
directory gets ``sweep.csv``, ``sweep.md`` and ``sweep.png`` (every member's
curves, the best marked), and ``summary.json`` lists the members.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import tomllib
from pathlib import Path

from fundl import config as cfg


def parse_sweep(text: str) -> tuple[str, list]:
    """``"section.key=v1,v2,..."`` -> ``("section.key", [v1, v2, ...])``, each value parsed as TOML
    (commas inside brackets or quotes belong to the value, e.g. ``model.hidden=[64],[64,64]``)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise cfg.ConfigError(f"--sweep expects section.key=v1,v2,..., got {text!r}")
    key, raw = (part.strip() for part in text.split("=", 1))
    section, _, name = key.partition(".")
    if section not in cfg.SCHEMA or name not in cfg.SCHEMA[section]:
        raise cfg.ConfigError(f"--sweep {text!r}: {key!r} is not a config setting")
    values, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(raw + ","):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            item = raw[start:i].strip()
            if not item:
                raise cfg.ConfigError(f"--sweep {text!r}: an empty value")
            try:
                values.append(tomllib.loads(f"v = {item}")["v"])
            except tomllib.TOMLDecodeError:
                values.append(item)  # a bare word is a string, as with --set
            start = i + 1
    if len(values) < 1:
        raise cfg.ConfigError(f"--sweep {text!r}: no values")
    return key, values


def sweep_of(config: dict) -> dict[str, list]:
    """``training.sweep`` as ``{key: values}`` (insertion order kept; a key twice is an error)."""
    out = {}
    for text in config["training"]["sweep"]:
        key, values = parse_sweep(text)
        if key in out:
            raise cfg.ConfigError(f"training.sweep names {key} twice")
        out[key] = values
    return out


def with_overrides(config: dict, overrides: dict) -> dict:
    """``config`` with ``{"section.key": value}`` applied, validated as any config."""
    raw = {section: dict(entries) for section, entries in config.items()}
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        raw[section][name] = value
    raw["training"]["sweep"] = []
    raw["training"]["ensemble"] = 1
    return cfg.validate(raw, source=f"sweep member {overrides}")


def members(config: dict) -> list[dict]:
    """One dict of overrides per member (``{}`` for a plain run's single member)."""
    n, sweep = config["training"]["ensemble"], sweep_of(config)
    if sweep and n > 1:
        raise cfg.ConfigError(f"training.ensemble = {n} with training.sweep: sweep the seed instead "
                              f"(--sweep training.seed=0,1,...)")
    if sweep:
        return [dict(zip(sweep, combo)) for combo in itertools.product(*sweep.values())]
    seed = config["training"]["seed"]
    return [{"training.seed": seed + i} for i in range(n)] if n > 1 else [{}]


def in_one_program(config: dict) -> tuple[bool, list[str]]:
    """Whether the members can share one compiled program, and the swept keys that prevent it."""
    from fundl.train.optim import injectable

    sweep = sweep_of(config)
    ok = {"training.seed"} | {f"optimizer.{k}" for k in injectable(config)}
    separate = [k for k in sweep if k not in ok]
    return not separate, separate


def injected(config: dict) -> tuple[str, ...]:
    """The optimiser settings a one-program sweep keeps as per-member arrays."""
    return tuple(k.split(".", 1)[1] for k in sweep_of(config) if k.startswith("optimizer."))


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
