"""Reproduce the MNIST-1D paper's table: each model for several seeds, beside the paper's number.

    python scripts/reproduce_mnist1d.py [--seeds 5] [--steps N] [--models cnn,gru,...]
                                        [--out-dir docs] [--runs-dir runs/reproduce_mnist1d]
                                        [--torch-reference [MODELS]] [--variant SECTION.KEY=VALUE ...]
    python scripts/reproduce_mnist1d.py --render-only [--out-dir docs]

The figures in docs/reproduction.md come from
``python scripts/reproduce_mnist1d.py --torch-reference --variant data.shuffle=true``
(its wall time is in that file).  Installed, the command is ``fundl-reproduce-mnist1d``.

Models: the paper's four (configs/mnist1d_paper_{logistic,mlp,cnn,gru}.toml, which follow
github.com/greydanus/mnist1d notebooks/models.py and train.py) and fundl's own
configs/mnist1d_cnn.toml and configs/mnist1d_lstm.toml.  Each model's seeds train as one
run through ``fundl.run.experiment.run`` with ``training.ensemble = --seeds`` (member ``i``:
seed ``i``; one vmapped program, each member equal to a run of its own seed), so the wall
time is that of all seeds together.  The test accuracy is each member's after the last
step; the table gives the mean ± sample std over seeds.

``--torch-reference [MODELS]`` also trains the paper's own PyTorch code (its models and training
loop, retyped below: sequential unshuffled batches, ``steps + 1`` Adam updates) for the same
seeds on the same data, for the paper's four models: what the paper's code gives on this
machine, the experiment that tells a gap in fundl from a gap in the paper's number.
``--variant KEY=VALUE`` trains every model whose mean falls more than one std below the
paper's again with that override (e.g. ``data.shuffle=true``), a second experiment.
``--render-only`` rewrites the markdown from the JSON.

Writes OUT_DIR/reproduction.md and OUT_DIR/reproduction.json (per-seed numbers, machine,
wall times) and prints the table.  ``--steps`` shortens every run (for tests).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository, whose configs/ this reads (fundl/run/ is two below)

# name -> (config, label, paper's accuracy or None, what the paper number is)
MODELS = {
    "logistic": ("configs/mnist1d_paper_logistic.toml", "Logistic regression (paper's)", 0.32, "logistic regression"),
    "mlp": ("configs/mnist1d_paper_mlp.toml", "MLP (paper's)", 0.68, "MLP"),
    "cnn": ("configs/mnist1d_paper_cnn.toml", "CNN (paper's)", 0.94, "CNN"),
    "gru": ("configs/mnist1d_paper_gru.toml", "GRU (paper's)", 0.91, "GRU"),
    "fundl_cnn": ("configs/mnist1d_cnn.toml", "fundl CNN (batch norm, cosine)", 0.94, "CNN, a different model"),
    "fundl_lstm": ("configs/mnist1d_lstm.toml", "fundl LSTM (128 units)", 0.91, "GRU, a different model"),
}
PAPER_MODELS = ("logistic", "mlp", "cnn", "gru")
# The test accuracy (%) the paper's own notebooks log at step 6000 (seed 42), in their saved outputs:
# quickstart.ipynb at the repository's first commit 08ff47f (2020-11-28, whose README has the table)
# and notebooks/mnist1d-classification.ipynb at d537845 (2024-05-16).
PAPER_LOGS = {"logistic": (31.7, 31.5), "mlp": (64.6, 65.1), "cnn": (92.5, 92.3), "gru": (91.1, 89.1)}
PAPER_SOURCE = ("github.com/greydanus/mnist1d README, \"Comparing MNIST and MNIST-1D\" (Greydanus & Kobak, "
                "\"Scaling down deep learning with MNIST-1D\", ICML 2024)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5, help="seeds per model (members of one ensemble run)")
    p.add_argument("--steps", type=int, default=0, help="training steps of every run (0: each config's own)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--out-dir", default=str(ROOT / "docs"), help="where reproduction.md/.json go")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "reproduce_mnist1d"), help="run directories")
    p.add_argument("--variant", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="train every model whose mean falls more than one std below the paper's again with this "
                        "override (repeatable: all apply together), as an experiment for the report")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite OUT_DIR/reproduction.md from OUT_DIR/reproduction.json, training nothing")
    p.add_argument("--torch-reference", nargs="?", const=",".join(PAPER_MODELS), default="", metavar="MODELS",
                   help="also train the paper's PyTorch code (needs torch) for these of the paper's models "
                        "(comma-separated; all four when no value is given)")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"--models: expected names from {', '.join(MODELS)}, got {args.models}")
    args.torch_reference = [m.strip() for m in args.torch_reference.split(",") if m.strip()]
    if any(m not in PAPER_MODELS for m in args.torch_reference):
        p.error(f"--torch-reference: expected names from {', '.join(PAPER_MODELS)}, got {args.torch_reference}")
    if args.seeds < 1 or args.steps < 0:
        p.error(f"--seeds must be >= 1 and --steps >= 0, got --seeds {args.seeds} --steps {args.steps}")
    return args


# ------------------------------------------------------------------ fundl
def train_fundl(name: str, seeds: int, steps: int, runs_dir: Path, variant: list[str] = ()) -> dict:
    """Train ``name``'s config (with the ``variant`` overrides) for ``seeds`` seeds as one ensemble run;
    its per-seed results."""
    from fundl.run import config as cfg
    from fundl.run.experiment import run
    from fundl.run.rundir import read_metrics

    path = ROOT / MODELS[name][0]
    overrides = [f"training.ensemble={seeds}", "training.seed=0", "training.progress=false", "logging.plots=false"]
    overrides += [f"training.steps={steps}", f"training.eval_every={max(steps // 4, 1)}"] if steps else []
    config = cfg.load_config(path, overrides + list(variant))
    run_dir = runs_dir / (name + ("_variant" if variant else ""))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    summary = run(config, run_dir, config_path=str(path.relative_to(ROOT)), verbose=False, overwrite=True)
    wall = time.perf_counter() - t0
    members = summary.get("members") or [{"seed": 0, "test_accuracy": summary["test_accuracy"],
                                          "test_loss": summary["test_loss"]}]
    return {"seeds": [m["seed"] for m in members], "test_accuracy": [m["test_accuracy"] for m in members],
            "test_loss": [m["test_loss"] for m in members], "best_eval_accuracy": _best_evals(
                read_metrics(run_dir), len(members)), "steps": summary["final_step"],
            "num_params": summary.get("num_params"), "wall_seconds": wall,
            "compile_seconds": summary.get("compile_seconds"), "run_dir": _relative(run_dir),
            "load_average": [round(load, 2), round(os.getloadavg()[0], 2)]}


def _relative(path: Path) -> str:
    """``path`` relative to the repository when inside it (the report names no machine's folders)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _best_evals(records: list[dict], n: int) -> list[float]:
    """Each member's highest test accuracy over the run's evaluations (the paper's curves show every 250 steps)."""
    evals = [r.get("members") or [r] for r in records if r.get("split") == "eval"]
    return [max(e[i]["accuracy"] for e in evals) for i in range(n)] if evals else []


# ------------------------------------------------------------------ the paper's PyTorch code
def paper_torch_model(name: str):
    """The paper's PyTorch model ``name`` (notebooks/models.py: LinearBase, MLPBase, ConvBase,
    GRUBase), retyped; inputs (N, 40)."""
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear1, self.linear2, self.linear3 = nn.Linear(40, 100), nn.Linear(100, 100), nn.Linear(100, 10)

        def forward(self, x):
            h = self.linear1(x).relu()
            h = h + self.linear2(h).relu()
            return self.linear3(h)

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv1d(1, 25, 5, stride=2, padding=1)
            self.conv2 = nn.Conv1d(25, 25, 3, stride=2, padding=1)
            self.conv3 = nn.Conv1d(25, 25, 3, stride=2, padding=1)
            self.linear = nn.Linear(125, 10)

        def forward(self, x):
            h = self.conv1(x.view(-1, 1, x.shape[-1])).relu()
            h = self.conv3(self.conv2(h).relu()).relu()
            return self.linear(h.view(h.shape[0], -1))

    class GRU(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(1, 6, batch_first=True, bidirectional=True)
            self.linear = nn.Linear(2 * 6 * 40, 10)

        def forward(self, x):
            out, _ = self.gru(x.view(*x.shape[:2], 1), torch.zeros(2, x.shape[0], 6))
            return self.linear(out.reshape(out.shape[0], -1))

    makers = {"logistic": lambda: nn.Linear(40, 10), "mlp": MLP, "cnn": CNN, "gru": GRU}
    return makers[name]()


def train_torch(name: str, seed: int, steps: int, data: dict) -> float:
    """notebooks/train.py's loop: Adam(lr 1e-2), batch 100 taken in order without shuffling,
    ``steps + 1`` updates (``range(total_steps + 1)``); the final test accuracy."""
    import torch

    torch.manual_seed(seed)
    model = paper_torch_model(name)
    opt = torch.optim.Adam(model.parameters(), 1e-2, weight_decay=0)
    x, y = torch.tensor(data["x"], dtype=torch.float32), torch.tensor(data["y"], dtype=torch.long)
    loss_fn = torch.nn.CrossEntropyLoss()
    for step in range(steps + 1):
        i = (step * 100) % len(x)
        loss = loss_fn(model(x[i:i + 100]), y[i:i + 100])
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        pred = model(torch.tensor(data["x_test"], dtype=torch.float32)).argmax(-1).numpy()
    return float((pred == data["y_test"]).mean())


def torch_reference(name: str, seeds: int, steps: int) -> dict:
    import torch

    from fundl.data.mnist1d import load_mnist1d

    torch.set_num_threads(1)  # one thread: faster for these small models on a shared machine (docs/benchmarks.md)
    data = load_mnist1d()
    steps = steps or 6000
    t0 = time.perf_counter()
    acc = [train_torch(name, s, steps, data) for s in range(seeds)]
    return {"seeds": list(range(seeds)), "test_accuracy": acc, "steps": steps + 1,
            "wall_seconds": time.perf_counter() - t0, "torch": torch.__version__, "threads": 1}


# ------------------------------------------------------------------ report
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0


def machine() -> dict:
    import jax

    cpu = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
            "python": platform.python_version(), "platform": platform.platform()}


def _with_stats(result: dict) -> dict:
    return {**result, **dict(zip(("mean", "std"), mean_std(result["test_accuracy"])))}


def row(name: str, result: dict, reference: dict | None) -> dict:
    """One model's entry of reproduction.json."""
    config, label, paper, paper_what = MODELS[name]
    mean, std = mean_std(result["test_accuracy"])
    out = {"name": name, "label": label, "config": config, "paper_accuracy": paper, "paper_model": paper_what,
           "mean": mean, "std": std, **result}
    if name in PAPER_LOGS:
        out["paper_logs"] = dict(zip(("2020", "2024"), PAPER_LOGS[name]))
    if result["best_eval_accuracy"]:
        out["best_eval_mean"], out["best_eval_std"] = mean_std(result["best_eval_accuracy"])
    out["below_paper"] = paper is not None and mean < paper - std
    if reference is not None:
        out["torch_reference"] = _with_stats(reference)
    return out


def _pct(mean: float, std: float | None = None) -> str:
    return f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def table(rows: list[dict]) -> list[str]:
    ref = any("torch_reference" in r for r in rows)
    head = ("| model | config | params | steps | paper | paper's logs | fundl: mean ± std | per seed | best eval "
            "| wall time |")
    lines = [head + (" paper's code here | its wall time |" if ref else ""),
             "|" + "---|" * (10 + 2 * ref)]
    for r in rows:
        paper = f"{100 * r['paper_accuracy']:.0f}" + ("" if r["name"] in PAPER_MODELS else f" ({r['paper_model']})")
        best = _pct(r["best_eval_mean"], r["best_eval_std"]) if "best_eval_mean" in r else ""
        logs = ", ".join(f"{v:.1f}" for v in PAPER_LOGS[r["name"]]) if r["name"] in PAPER_LOGS else ""
        cells = [r["label"], f"`{r['config']}`", f"{r['num_params']:,}", str(r["steps"]), paper, logs,
                 f"**{_pct(r['mean'], r['std'])}**" + (" ↓" if r["below_paper"] else ""),
                 ", ".join(_pct(a) for a in r["test_accuracy"]), best, _minutes(r["wall_seconds"])]
        if ref:
            t = r.get("torch_reference")
            cells += [_pct(t["mean"], t["std"]), _minutes(t["wall_seconds"])] if t else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def findings(rows: list[dict]) -> list[str]:
    """One paragraph per model whose mean is more than one std below the paper's number."""
    out = []
    for r in (r for r in rows if r["below_paper"]):
        text = (f"* **{r['label']}**: {_pct(r['mean'], r['std'])} against the paper's {100 * r['paper_accuracy']:.0f}"
                f" ({100 * (r['paper_accuracy'] - r['mean']):.1f} points below).")
        t = r.get("torch_reference")
        if t:
            gap = r["mean"] - t["mean"]
            text += (f" The paper's own PyTorch code, trained here on the same data for the same seeds, gives "
                     f"{_pct(t['mean'], t['std'])}: fundl is {abs(100 * gap):.1f} points "
                     f"{'above' if gap >= 0 else 'below'} it"
                     f"{' (within one std of either)' if abs(gap) <= max(r['std'], t['std']) else ''}.")
            if t["mean"] < r["paper_accuracy"] - t["std"]:
                text += " The paper's code falls short of its README number here too."
        elif r["name"] in PAPER_MODELS:
            text += " (Run with --torch-reference to train the paper's own code beside it.)"
        v = r.get("variant")
        if v:
            text += (f" The same config with {', '.join(f'`{o}`' for o in v['overrides'])}, trained the same way: "
                     f"{_pct(v['mean'], v['std'])}.")
        if r["name"] in PAPER_LOGS:
            old, new = PAPER_LOGS[r["name"]]
            text += (f" The paper's own notebooks log {old:.1f} (2020) and {new:.1f} (2024) for this model at step "
                     f"6000 (seed 42).")
        out.append(text)
    return out


def legend(report: dict) -> list[str]:
    """What each column of the table means."""
    n = report["seeds"]
    return [
        (f"* **fundl**: test accuracy (%) on the 1000 MNIST-1D test sequences after the last training step, mean ± "
         f"sample std over {n} seeds (0 to {n - 1}, *per seed* in order). Each model's seeds train as one ensemble "
         f"run through `fundl.run.experiment.run` (`training.ensemble = {n}`, one vmapped program; member i equals a "
         f"run with seed i), so *wall time* covers all seeds, compilation included."),
        f"* **paper**: {PAPER_SOURCE}. For fundl's own configs, the paper's number for the same family of model.",
        ("* **paper's logs**: what the paper's own notebooks print at step 6000 (seed 42, one run each): "
         "quickstart.ipynb at the repository's first commit 08ff47f (2020-11-28, whose README already has the "
         "table), then notebooks/mnist1d-classification.ipynb at d537845 (2024-05-16)."),
        ("* **best eval**: each seed's highest test accuracy over the run's evaluations (every "
         "`training.eval_every` steps of its config, and the last), averaged. It picks a step by the test set, so "
         "it is not a fair test figure; it shows how much the last step costs."),
        "* **↓**: the mean is more than one std below the paper's number (explained below).",
    ]


def markdown(report: dict) -> str:
    m, rows = report["machine"], report["models"]
    loads = [x for r in rows for x in r.get("load_average", [])]
    ref_seconds = sum(r.get("torch_reference", {}).get("wall_seconds", 0) for r in rows)
    variant_seconds = sum(r.get("variant", {}).get("wall_seconds", 0) for r in rows)
    lines = [
        "# Reproducing the MNIST-1D table",
        "",
        (f"Generated {report['date']} by `{report['command']}`; rerun it to regenerate this file and "
         f"`reproduction.json` (every per-seed number). Machine: {m['cpu']}, {m['cores']} cores, jax {m['jax']} "
         f"({m['backend']}), Python {m['python']}. Wall time in all: {_minutes(report['total_wall_seconds'])}"
         + (f", of which {_minutes(ref_seconds)} for the paper's PyTorch code" if ref_seconds else "")
         + (f" and {_minutes(variant_seconds)} for variants" if variant_seconds else "") + "."
         + (f" The machine was shared with other jobs: 1-minute load average {min(loads):.1f} to "
            f"{max(loads):.1f} during the runs." if loads else "")),
        "",
        *table(rows),
        "",
        *legend(report),
    ]
    if any("torch_reference" in r for r in rows):
        lines += [REFERENCE_NOTE]
    lines += ["", "## Below the paper", ""]
    lines += findings(rows) or ["No model's mean is more than one std below the paper's number."]
    lines += ["", "## What differs from the paper's code, by design", "", *DIFFERENCES, ""]
    if report.get("steps"):
        lines += [f"**Shortened run** (`--steps {report['steps']}`): these are not the real figures.", ""]
    return "\n".join(lines)


REFERENCE_NOTE = (
    "* **paper's code here**: the paper's PyTorch models and training loop (notebooks/models.py, notebooks/train.py, "
    "retyped in fundl/run/reproduce_mnist1d.py), trained on this machine for the same seeds on the same data "
    "(sequential, unshuffled batches; steps + 1 updates); one seed after another.")
DIFFERENCES = [
    ("* Data: identical arrays (fundl generates MNIST-1D offline with the `mnist1d` package; they equal the "
     "repository's `mnist1d_data.pkl` to 1e-15). The model sees (N, 40, 1); the paper's reshapes (N, 40) the "
     "same way."),
    ("* Batches: the paper's configs take the batches in the paper's fixed order, never reshuffled "
     "(`data.shuffle = false`), as its loop does, so seeds differ only in the initial weights; fundl's own "
     "configs reshuffle the training set every epoch, seeded per member."),
    ("* Seeds: the paper's notebook runs seed 42 once; here seeds 0, 1, ... fundl's random numbers are JAX's, so "
     "no seed gives the same initial weights as torch's."),
    "* Steps: 6000 Adam updates here; the paper's loop makes 6001 (`range(total_steps + 1)`).",
    ("* The CNN flattens its features as (time, channel) where torch flattens (channel, time): the same model up "
     "to a permutation of the readout's rows (tests/test_paper_models.py checks outputs equal on ported weights)."),
]


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "reproduction.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "reproduction.md").write_text(markdown(report))


def command(argv) -> str:
    return "python scripts/reproduce_mnist1d.py" + "".join(" " + shlex.quote(a) for a in argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.render_only:
        report = json.loads((Path(args.out_dir) / "reproduction.json").read_text())
        write_report(report, Path(args.out_dir))
        print("\n".join(table(report["models"])))
        return 0
    os.environ.setdefault("MPLBACKEND", "Agg")
    rows = []
    for name in args.models:
        print(f"reproduce_mnist1d: {name} ({MODELS[name][0]}), {args.seeds} seeds ...", flush=True)
        result = train_fundl(name, args.seeds, args.steps, Path(args.runs_dir))
        ref = torch_reference(name, args.seeds, args.steps) if name in args.torch_reference else None
        rows.append(row(name, result, ref))
        if args.variant and rows[-1]["below_paper"]:
            print(f"  below the paper: training the variant {' '.join(args.variant)}", flush=True)
            variant = train_fundl(name, args.seeds, args.steps, Path(args.runs_dir), args.variant)
            rows[-1]["variant"] = {"overrides": list(args.variant), **_with_stats(variant)}
        print(f"  {_pct(rows[-1]['mean'], rows[-1]['std'])} in {_minutes(result['wall_seconds'])}"
              + (f"; paper's code: {_pct(*mean_std(ref['test_accuracy']))}" if ref else ""), flush=True)
    report = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "command": command(argv), "machine": machine(), "seeds": args.seeds, "steps": args.steps or None,
              "total_wall_seconds": sum(r["wall_seconds"] + r.get("torch_reference", {}).get("wall_seconds", 0)
                                        + r.get("variant", {}).get("wall_seconds", 0) for r in rows),
              "models": rows}
    write_report(report, Path(args.out_dir))
    print("\n".join(table(rows)))
    print(f"wrote {Path(args.out_dir) / 'reproduction.md'} and reproduction.json")
    return 0



def console() -> None:
    """The ``fundl-reproduce-mnist1d`` console script: huge pages first (before JAX), then :func:`main`."""
    from fundl.run.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages()
    sys.exit(main())
