"""nanoGPT's CPU "baby" recipe in fundl and in nanoGPT's own model.py (PyTorch eager), side by side.

    python -m benchmarks.bench_nanogpt --nanogpt DIR [--steps 2000] [--chunk 100] [--eval-every 500]
                                       [--config configs/shakespeare_char_gpt.toml] [--set KEY=VALUE ...]
                                       [--shipped] [--torch-threads N] [--quick] [--out DIR]

``DIR`` is a checkout of karpathy/nanoGPT (or ``$NANOGPT_DIR``): its ``model.py`` is imported from
there (MIT; fundl does not copy it).  Both sides train nanoGPT's baby recipe: ``--config`` (fundl's shipped
``configs/shakespeare_char_gpt.toml``) with the overrides ``BABY`` (then ``--set``), that is 4 layers,
4 heads, width 128, context 64, batch 12, 2000 steps, AdamW 1e-3 with betas (0.9, 0.99), weight decay 0.1
on >= 2-D parameters, warm-up 100 then cosine to 1e-4, clipping 1.0, no dropout, no biases
(``--shipped``: the shipped config's own recipe instead), on the same data:

* the split: the first 90% of Tiny Shakespeare trains, the rest validates (``fundl.data``'s
  ``shakespeare``: non-overlapping windows of the context's length);
* the batches: fundl's ``Loader`` (seed ``training.seed``) makes every batch once, and both sides
  train on that same sequence, step for step;
* the schedule: PyTorch's learning rate is set before each step to fundl's schedule of that step
  (the optax schedule the config builds), the same number for both;
* the optimiser: nanoGPT's ``GPT.configure_optimizers`` (``torch.optim.AdamW``, two groups), then
  ``clip_grad_norm_`` as nanoGPT's train.py; fundl's from the config (``fundl.run.build``).

fundl runs its step as ``fit`` does (fused: ``fundl.train.fusion.resolve`` picks K steps per dispatch
for the step); PyTorch runs nanoGPT's train loop body eagerly, ``torch.set_num_threads(cores)``
(``--torch-threads``).
Timing: ``--chunk`` steps of one side, then of the other, the order rotated each round
(``benchmarks.harness.interleaved``), until both have trained ``--steps`` steps; the ratio of
PyTorch's time per step to fundl's is the median of the per-round ratios (> 1: fundl faster).
Compilation (fundl) and the first steps' warm-up (both) happen before timing: one chunk of
each is trained and timed apart.  The validation loss is the mean cross-entropy over every window
of the validation split, every ``--eval-every`` steps and at the end.

Targets (issue 25): fundl's validation loss within 0.03 nats of nanoGPT's at the last step, and
fundl's time per step at least 1.0x PyTorch eager's.  ``--quick``: 20 steps in chunks of 10 (warm-up
5) and a 64-window validation subset, for the test that checks the benchmark runs.
Output: a table on stdout, ``--out DIR``: ``DIR/nanogpt.json`` and ``DIR/nanogpt.md``.
docs/benchmarks.md records the runs.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

from benchmarks import harness

CONFIG = harness.CONFIGS / "shakespeare_char_gpt.toml"
# nanoGPT's baby recipe is the shipped config (same model, optimiser and schedule shape) with nanoGPT's context,
# batch, rate and length: applied before --set, skipped with --shipped (the shipped recipe itself).
BABY = ("data.seq_len=64", "training.batch_size=12", "optimizer.learning_rate=1e-3", "training.steps=2000",
        "schedule.warmup_steps=100")


def nanogpt_module(directory: str | os.PathLike):
    """nanoGPT's ``model.py`` from a checkout, imported under the name ``nanogpt_model``."""
    path = Path(directory) / "model.py"
    if not path.is_file():
        raise SystemExit(f"bench_nanogpt: no model.py in {directory}: give a checkout of karpathy/nanoGPT with "
                         f"--nanogpt DIR or NANOGPT_DIR")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Batches:
    """Every training batch of the run, made once by fundl's loader: both sides train on them."""

    def __init__(self, data, batch_size: int, seed: int, steps: int):
        from fundl.data import Loader

        loader = Loader(data.train, batch_size, seed=seed, drop_last=True, prefetch=0)
        per_epoch = loader.steps_per_epoch
        made = [loader.batch(t // per_epoch, t % per_epoch) for t in range(steps)]
        self.x, self.y = [b["x"] for b in made], [b["y"] for b in made]
        self.steps_per_epoch = per_epoch


class FundlSide:
    """The config's model, optimiser and step from ``fundl.run.build``, fused as ``fit`` fuses it."""

    name = "fundl"

    def __init__(self, config: dict, data, batches: Batches, val: dict):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from fundl.losses import softmax_cross_entropy
        from fundl.run import build
        from fundl.train.fusion import Fusion, make_multi_step, resolve

        self.jax, self.np, self.batches = jax, np, batches
        self.model, optimizer, self.state = build.initial_state(config, data, batches.steps_per_epoch)
        step = build.train_step_for(config, self.model, optimizer)
        first = {"x": jnp.asarray(batches.x[0]), "y": jnp.asarray(batches.y[0])}
        t = config["training"]
        self.k, unroll = resolve(Fusion(t["steps_per_call"], t["unroll"]), step, self.state, first)
        self.multi = jax.jit(make_multi_step(step, unroll=unroll), donate_argnums=0)
        self.step = 0
        self.last_losses = []
        model = self.model

        def val_loss_sum(params, model_state, x, y):
            logits, _ = model.apply(params, model_state, x)
            return jnp.sum(softmax_cross_entropy(logits.astype(jnp.float32), y))

        self.val_fn = jax.jit(val_loss_sum)
        self.val = val

    def train(self, n: int) -> float:
        """Train ``n`` steps (a multiple of K); the wall seconds, the device drained."""
        np, jax = self.np, self.jax
        if n % self.k:
            raise ValueError(f"bench_nanogpt: --chunk must be a multiple of fundl's {self.k} steps per call")
        t0 = time.perf_counter()
        losses = []
        for s in range(self.step, self.step + n, self.k):
            group = {"x": np.stack(self.batches.x[s:s + self.k]), "y": np.stack(self.batches.y[s:s + self.k])}
            self.state, metrics = self.multi(self.state, group)
            losses.append(metrics["loss"])
        jax.block_until_ready(self.state)
        seconds = time.perf_counter() - t0
        self.step += n
        self.last_losses = [float(v) for m in losses for v in np.asarray(m)]
        return seconds

    def val_loss(self, batch: int = 256) -> float:
        x, y = self.val["x"], self.val["y"]
        total = sum(float(self.val_fn(self.state.params, self.state.model_state, x[i:i + batch], y[i:i + batch]))
                    for i in range(0, len(x), batch))
        return total / y.size


class TorchSide:
    """nanoGPT's GPT and ``configure_optimizers``, stepped as its train.py steps (eager)."""

    name = "nanogpt"

    def __init__(self, module, config: dict, data, batches: Batches, val: dict, schedule):
        import torch

        m, o = config["model"], config["optimizer"]
        self.torch, self.batches, self.val, self.schedule = torch, batches, val, schedule
        torch.manual_seed(1337 + config["training"]["seed"])
        conf = module.GPTConfig(block_size=config["data"]["seq_len"], vocab_size=data.num_classes,
                                n_layer=m["layers"], n_head=m["heads"], n_embd=m["width"], dropout=m["dropout"],
                                bias=m["bias"])
        self.model = module.GPT(conf)
        self.model.train()
        betas = (0.9 if o["b1"] == "auto" else o["b1"], 0.999 if o["b2"] == "auto" else o["b2"])  # torch's defaults
        self.opt = self.model.configure_optimizers(o["weight_decay"], o["learning_rate"], betas, "cpu")
        self.clip = o["clip_norm"]
        self.step = 0
        self.last_losses = []

    def train(self, n: int) -> float:
        torch = self.torch
        t0 = time.perf_counter()
        losses = []
        for s in range(self.step, self.step + n):
            lr = float(self.schedule(s))
            for group in self.opt.param_groups:
                group["lr"] = lr
            x = torch.from_numpy(self.batches.x[s].astype("int64"))
            y = torch.from_numpy(self.batches.y[s].astype("int64"))
            _, loss = self.model(x, y)
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        seconds = time.perf_counter() - t0
        self.step += n
        self.last_losses = [float(v) for v in losses]
        return seconds

    def val_loss(self, batch: int = 256) -> float:
        torch = self.torch
        x, y = self.val["x"], self.val["y"]
        self.model.eval()
        total = 0.0
        with torch.no_grad():
            for i in range(0, len(x), batch):
                xb = torch.from_numpy(x[i:i + batch].astype("int64"))
                yb = torch.from_numpy(y[i:i + batch].astype("int64"))
                _, loss = self.model(xb, yb)
                total += float(loss) * yb.numel()
        self.model.train()
        return total / y.size


def parse_args(argv):
    p = harness.parser(__doc__, __spec__.name if __spec__ else "benchmarks.bench_nanogpt")
    p.add_argument("--nanogpt", default=os.environ.get("NANOGPT_DIR", ""),
                   help="a checkout of karpathy/nanoGPT (default $NANOGPT_DIR)")
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--shipped", action="store_true",
                   help="the config as it is, without the baby recipe's overrides (BABY)")
    p.add_argument("--steps", type=int, default=0, help="steps per side (default: the config's training.steps)")
    p.add_argument("--chunk", type=int, default=100, help="steps per side per interleaved round")
    p.add_argument("--eval-every", type=int, default=500, help="steps between validation losses (and the last)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: the cores)")
    p.add_argument("--quick", action="store_true",
                   help="20 steps (warm-up 5), chunks of 10, 64 validation windows")
    harness.add_out(p)
    args = p.parse_args(argv)
    if not args.nanogpt:
        p.error("give a nanoGPT checkout: --nanogpt DIR or NANOGPT_DIR")
    if args.quick:
        args.steps, args.chunk, args.eval_every = 20, 10, 0
    return args


def markdown(result: dict) -> str:
    head = ["side", "val loss " + " / ".join(f"@{s}" for s in result["eval_steps"]), "train loss (last chunk)",
            "ms / step median", "min", "max"]
    rows = []
    for name in ("fundl", "nanogpt"):
        r = result["sides"][name]
        ms = harness.spread([1e3 * s / result["chunk"] for s in r["chunk_seconds"]])
        rows.append([name, " / ".join(f"{v:.4f}" for v in r["val_loss"]), f"{r['train_loss_last_chunk']:.4f}",
                     f"{ms['median']:.1f}", f"{ms['min']:.1f}", f"{ms['max']:.1f}"])
    t = result["targets"]
    lines = [harness.header(result), "",
             f"{result['steps']} steps per side in interleaved chunks of {result['chunk']}; fundl fused "
             f"K={result['fundl_steps_per_call']}; torch {result['versions'].get('torch', '?')} eager, "
             f"{result['torch_threads']} threads; validation: {result['val_windows']} windows.", "",
             harness.markdown_table(head, rows, "lllrrr"), "",
             f"val loss, fundl - nanoGPT: {t['val_loss_gap']:+.4f} nats (target: within 0.03); "
             f"nanoGPT's time per step / fundl's: {t['torch_over_fundl_time']:.2f}x "
             f"(target: >= 1.0; median of per-round ratios)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    module = nanogpt_module(args.nanogpt)

    import torch

    from fundl.run.build import load_data, total_steps_of
    from fundl.run.config import load_config
    from fundl.run.optimizer import schedule_from_config

    started = harness.start()
    overrides = ([] if args.shipped else list(BABY)) + list(args.set) + ([f"training.steps={args.steps}"] if args.steps else [])
    if args.quick:
        overrides.append("schedule.warmup_steps=5")
    config = load_config(args.config, overrides)
    steps = config["training"]["steps"]
    if steps % args.chunk:
        raise SystemExit(f"bench_nanogpt: --steps {steps} must be a multiple of --chunk {args.chunk}")
    data = load_data(config)
    val = {k: v[:64] for k, v in data.test.items()} if args.quick else data.test
    batches = Batches(data, config["training"]["batch_size"], config["training"]["seed"], steps)
    schedule = schedule_from_config(config, total_steps_of(config, batches.steps_per_epoch))
    torch.set_num_threads(args.torch_threads or harness.cpu_count())

    fundl_side = FundlSide(config, data, batches, val)
    torch_side = TorchSide(module, config, data, batches, val, schedule)
    sides = {"fundl": fundl_side, "nanogpt": torch_side}
    record = {name: {"chunk_seconds": [], "val_loss": []} for name in sides}
    eval_steps = []

    def evaluate(step):
        eval_steps.append(step)
        for name, side in sides.items():
            record[name]["val_loss"].append(side.val_loss())
        print(f"step {step}: val loss " + ", ".join(f"{n} {record[n]['val_loss'][-1]:.4f}" for n in sides),
              file=sys.stderr, flush=True)

    # the first chunk of each: compilation and warm-up, timed apart
    first = {name: side.train(args.chunk) for name, side in sides.items()}
    rounds = steps // args.chunk - 1

    def on_round(r, figures):
        done = args.chunk * (r + 2)
        print(f"step {done}: " + ", ".join(f"{n} {1e3 * figures[n][-1] / args.chunk:.1f} ms/step" for n in sides),
              file=sys.stderr, flush=True)
        if args.eval_every and done % args.eval_every == 0 and done < steps:
            evaluate(done)

    times = {name: [seconds] for name, seconds in first.items()}  # with one chunk only: the first
    if rounds:
        times = harness.interleaved({name: (lambda s=side: s.train(args.chunk)) for name, side in sides.items()},
                                    rounds, on_round)
    evaluate(steps)
    for name, side in sides.items():
        record[name]["chunk_seconds"] = times[name]
        record[name]["first_chunk_seconds"] = first[name]
        record[name]["train_loss_last_chunk"] = statistics.fmean(side.last_losses)

    result = harness.finish(started, "benchmarks.bench_nanogpt", argv)
    gap = record["fundl"]["val_loss"][-1] - record["nanogpt"]["val_loss"][-1]
    ratio = harness.median_ratio(times["nanogpt"], times["fundl"])
    result.update(steps=steps, chunk=args.chunk, eval_steps=eval_steps, sides=record, val_windows=len(val["y"]),
                  fundl_steps_per_call=fundl_side.k, torch_threads=torch.get_num_threads(),
                  nanogpt_dir=str(args.nanogpt), config=str(args.config), overrides=overrides,
                  targets={"val_loss_gap": gap, "val_loss_within_0.03": abs(gap) <= 0.03,
                           "torch_over_fundl_time": ratio, "fundl_at_least_as_fast": ratio >= 1.0})
    md = markdown(result)
    print(md)
    harness.write_result(args.out, "nanogpt", result, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
