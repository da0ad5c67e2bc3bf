"""Learn the learning rate by gradient descent on the validation loss, through K real training steps.

Usage:  python examples/meta_lr.py --out runs/meta_lr [--inner-steps 300] [--outer-steps 60]
            [--optimizer adam] [--init-lr 1e-4] [--outer-lr 0.15] [--lr-range 1e-4,1]
            [--sweep-points 9] [--batch 100] [--val 1000] [--seed 0]

MNIST-1D (generated offline), the MLP of configs/mnist1d_mlp_sweep.toml
(40 -> 100 -> 100 -> 10).  The training split is cut into a training part
and a held-out validation part (``--val`` examples); the test split is not
used.  One *inner* run is K = ``--inner-steps`` real training steps
(``make_train_step``, Adam (with ``eps_root=1e-8``) or SGD built with ``optax.inject_hyperparams``)
from a fixed initialisation, inside ``unrolled_training`` (``lax.scan``,
``jax.checkpoint`` on the step).  Each *outer* step differentiates the
validation loss after the inner run with respect to ``log(lr)`` and takes an
Adam step on ``log(lr)`` (kept inside ``--lr-range``); every outer step draws
a fresh order of training batches, as real training would.

The result is compared with a sweep over the same range: ``--sweep-points``
learning rates spaced evenly in log, trained as one vmapped ensemble
(fundl.train.ensemble.stack_states, set_hyperparams, ``jax.vmap`` of the
step) from the same initialisation on the same evaluation batch order as
the learned rate's final run, all evaluated on the same validation split.

Writes to ``--out``: meta_lr.png (learning rate and validation loss over
outer steps, and the sweep's validation loss against the learning rate with
the learned rate marked), meta_lr.json (history, sweep, comparison) and
meta_lr.md (the comparison table).

The file reads top to bottom: ``main`` (the steps of the experiment), then the
pieces it calls: the data split, the inner run, the outer loop, the sweep, the
report and the plot.
"""

import argparse
import json
import math
import time
from pathlib import Path

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fundl import models
from fundl.data import load_dataset
from fundl.losses import softmax_cross_entropy
from fundl.train.ensemble import stack_states
from fundl.train.optim import set_hyperparams
from fundl.train.state import create_train_state
from fundl.train.step import make_train_step
from fundl.transforms.through_training import unrolled_training, with_learning_rate


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for meta_lr.png/.json/.md")
    p.add_argument("--inner-steps", type=int, default=300, help="K: training steps differentiated through")
    p.add_argument("--outer-steps", type=int, default=60, help="gradient steps on log(lr)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"], help="the inner optimiser")
    p.add_argument("--init-lr", type=float, default=1e-4, help="the learning rate the outer loop starts from")
    p.add_argument("--outer-lr", type=float, default=0.15, help="Adam step size on log(lr)")
    p.add_argument("--lr-range", default="1e-4,1", help="LO,HI: the sweep's range; log(lr) is kept inside")
    p.add_argument("--sweep-points", type=int, default=9, help="learning rates in the sweep (log-spaced)")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--val", type=int, default=1000, help="training examples held out for validation")
    p.add_argument("--hidden", default="100,100", help="MLP hidden widths")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lo, hi = (float(v) for v in args.lr_range.split(","))
    if not 0 < lo < hi or not lo <= args.init_lr <= hi:
        raise SystemExit(f"--lr-range {args.lr_range}: need 0 < LO < HI with --init-lr {args.init_lr} inside")

    data = split_data(args.val, args.seed)
    inner = InnerRun(data, args)
    data_key, eval_key = jax.random.split(jax.random.key(args.seed + 1))
    log_lr, history = learn_rate(inner, args, data_key, lo, hi)
    meta_s = time.perf_counter() - t_start

    # The learned rate and the sweep: same initialisation, same batch order, same validation split.
    final_loss, final_acc = (float(v) for v in jax.jit(inner.after_training, static_argnums=2)(log_lr, eval_key, False))
    learned = {"lr": float(jnp.exp(log_lr)), "val_loss": final_loss, "val_accuracy": final_acc}
    sweep_rows = sweep(inner, eval_key, np.geomspace(lo, hi, args.sweep_points).astype(np.float32))
    return report(out_dir, args, learned, sweep_rows, history, meta_s, time.perf_counter() - t_start, lo, hi)


# ---------------------------------------------------------------------------
# The pieces


def split_data(val: int, seed: int) -> dict:
    """MNIST-1D's training split cut into a training part and ``val`` held-out examples, on the device;
    the test split is not touched."""
    ds = load_dataset("mnist1d")
    perm = np.random.default_rng(seed).permutation(len(ds.train["y"]))
    tr, va = perm[:-val], perm[-val:]
    return {"x": jnp.asarray(ds.train["x"][tr]), "y": jnp.asarray(ds.train["y"][tr]),
            "val": {"x": jnp.asarray(ds.train["x"][va]), "y": jnp.asarray(ds.train["y"][va])},
            "input_shape": tuple(ds.input_shape), "num_classes": ds.num_classes}


class InnerRun:
    """K real training steps from a fixed initialisation, as a function of ``log(lr)``, and the
    validation loss and accuracy after them."""

    def __init__(self, data: dict, args):
        self.data, self.K, self.B = data, args.inner_steps, args.batch
        self.model = models.mlp([int(h) for h in args.hidden.split(",")], data["num_classes"])
        # eps_root > 0: Adam's sqrt(nu) has an infinite derivative at nu = 0, so any exactly-zero
        # gradient entry (a dead ReLU unit) makes the meta-gradient NaN without it (optax's advice).
        extra = {"eps_root": 1e-8} if args.optimizer == "adam" else {}
        opt = optax.inject_hyperparams(getattr(optax, args.optimizer))(learning_rate=args.init_lr, **extra)
        self.state0 = create_train_state(self.model, opt, jax.random.key(args.seed), (1,) + data["input_shape"])
        self.step = make_train_step(self.model, opt)

    def batches(self, key) -> dict:
        """K batches of B training examples: epochs of shuffled indices, on the device."""
        n = len(self.data["y"])
        epochs = -(-self.K * self.B // n)
        idx = jnp.concatenate([jax.random.permutation(jax.random.fold_in(key, e), n) for e in range(epochs)])
        idx = idx[:self.K * self.B].reshape(self.K, self.B)
        return {"x": self.data["x"][idx], "y": self.data["y"][idx]}

    def validation(self, params, model_state):
        val = self.data["val"]
        out, _ = self.model.apply(params, model_state, val["x"])
        return jnp.mean(softmax_cross_entropy(out, val["y"])), jnp.mean(jnp.argmax(out, -1) == val["y"])

    def after_training(self, log_lr, key, remat=True):
        s, _ = unrolled_training(self.step, with_learning_rate(self.state0, jnp.exp(log_lr)), self.batches(key),
                                 remat=remat)
        return self.validation(s.params, s.model_state)


def learn_rate(inner: InnerRun, args, data_key, lo: float, hi: float) -> tuple[jax.Array, list[dict]]:
    """Adam on ``log(lr)`` with the meta-gradient of the validation loss, ``--outer-steps`` times, a fresh
    batch order each step; ``log(lr)`` kept in ``[log lo, log hi]``.  The learned ``log(lr)`` and the history."""
    meta_grad = jax.jit(jax.value_and_grad(inner.after_training, has_aux=True))
    outer = optax.adam(args.outer_lr)
    log_lr = jnp.asarray(math.log(args.init_lr), jnp.float32)
    outer_state = outer.init(log_lr)
    outer_update = jax.jit(lambda g, s, p: outer.update(g, s, p))
    history = []
    for t in range(args.outer_steps):
        (loss, acc), g = meta_grad(log_lr, jax.random.fold_in(data_key, t))
        history.append({"outer_step": t, "lr": float(jnp.exp(log_lr)), "val_loss": float(loss),
                        "val_accuracy": float(acc), "d_val_loss_d_log_lr": float(g)})
        if not np.isfinite(float(g)):  # a diverging inner run: keep the rate, say so
            print(f"outer step {t}: non-finite meta-gradient at lr {history[-1]['lr']:.4g}; step skipped")
            continue
        upd, outer_state = outer_update(g, outer_state, log_lr)
        log_lr = jnp.clip(optax.apply_updates(log_lr, upd), math.log(lo), math.log(hi))
    return log_lr, history


def sweep(inner: InnerRun, key, lrs: np.ndarray) -> list[dict]:
    """Every learning rate of ``lrs`` trained as one vmapped ensemble from the same initialisation on
    the batch order of ``key``; each one's validation loss and accuracy."""
    states = stack_states([inner.state0] * len(lrs))
    states = states.replace(opt_state=set_hyperparams(states.opt_state, learning_rate=jnp.asarray(lrs)))
    batches = inner.batches(key)

    @jax.jit
    def run(states):
        def one(s):
            s, _ = unrolled_training(inner.step, s, batches, remat=False)
            return inner.validation(s.params, s.model_state)
        return jax.vmap(one)(states)

    losses, accs = (np.asarray(v, np.float64) for v in run(states))
    return [{"lr": float(lr), "val_loss": float(loss), "val_accuracy": float(acc)}
            for lr, loss, acc in zip(lrs, losses, accs)]


def report(out_dir: Path, args, learned: dict, sweep_rows: list[dict], history: list[dict], meta_s: float,
           total_s: float, lo: float, hi: float) -> dict:
    """meta_lr.json, meta_lr.md and meta_lr.png in ``out_dir``; the table printed; the result returned."""
    losses = np.array([r["val_loss"] for r in sweep_rows])
    best = sweep_rows[int(np.argmin(np.where(np.isfinite(losses), losses, np.inf)))]
    result = {"settings": vars(args), "learned": learned, "sweep_best": best, "sweep": sweep_rows,
              "history": history, "seconds": {"meta": round(meta_s, 1), "total": round(total_s, 1)}}
    (out_dir / "meta_lr.json").write_text(json.dumps(result, indent=1))
    K = args.inner_steps
    table = "\n".join([
        f"| after {K} {args.optimizer} steps (val: {args.val} held-out training examples) | lr | val loss | val accuracy |",
        "|---|---|---|---|",
        f"| learned by {args.outer_steps} outer gradient steps from {args.init_lr:g} | {learned['lr']:.4g} "
        f"| {learned['val_loss']:.4f} | {learned['val_accuracy']:.3f} |",
        f"| best of a {len(sweep_rows)}-point sweep over [{lo:g}, {hi:g}] | {best['lr']:.4g} | {best['val_loss']:.4f} "
        f"| {best['val_accuracy']:.3f} |",
    ])
    (out_dir / "meta_lr.md").write_text(table + "\n")
    plot(out_dir / "meta_lr.png", history, sweep_rows, learned, best, K, args.optimizer)
    print(table)
    print(f"meta-learning {meta_s:.1f} s, total {total_s:.1f} s; wrote {out_dir}/meta_lr.png, "
          f"meta_lr.json, meta_lr.md")
    return result


def plot(path, history, sweep_rows, learned, best, K, optimizer):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [h["outer_step"] for h in history]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ax[0].plot(t, [h["lr"] for h in history], marker=".", label="learned")
    ax[0].axhline(best["lr"], color="C1", ls="--", label=f"best of sweep ({best['lr']:.3g})")
    ax[0].set(yscale="log", xlabel="outer step", ylabel="learning rate", title="learning rate")
    ax[1].plot(t, [h["val_loss"] for h in history], marker=".", label="at the current rate")
    ax[1].axhline(best["val_loss"], color="C1", ls="--", label="best of sweep")
    ax[1].set(xlabel="outer step", ylabel="validation loss", title=f"validation loss after {K} {optimizer} steps")
    lrs, losses = [r["lr"] for r in sweep_rows], [r["val_loss"] for r in sweep_rows]
    ax[2].plot(lrs, losses, marker="o", label="sweep")
    ax[2].plot([learned["lr"]], [learned["val_loss"]], marker="*", ms=14, ls="", color="C3", label="learned")
    ax[2].set(xscale="log", xlabel="learning rate", ylabel="validation loss", title="sweep over the same range")
    finite = [v for v in losses + [learned["val_loss"]] if np.isfinite(v)]
    if finite:
        ax[2].set_ylim(min(finite) * 0.9, min(max(finite), 3.0) * 1.1)
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
