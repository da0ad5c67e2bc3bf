"""One GPT training step of nanoGPT's baby recipe, three ways in turn: fundl, fundl as before its CPU lowerings,
and nanoGPT's model.py under PyTorch eager.

    python -m benchmarks.bench_gpt_step [--nanogpt DIR] [--rounds 6] [--seconds 3] [--set KEY=VALUE ...]
                                        [--torch-threads N] [--out DIR]

The model and optimiser are ``configs/shakespeare_char_gpt.toml`` with ``bench_nanogpt.BABY`` (4 x 128, 4 heads,
context 64, batch 12, AdamW, clipping 1.0), then ``--set``.  Variants, each one training step per call on the
same first batch of the training split (``fundl.run.build``'s jitted step, as ``scripts/train.py`` builds it):

* ``fundl``: the library as it is (on CPU: attention as 3-D batched products, ``fundl.nn.attention_lowering``;
  the MLP's exact GELU through ``erf``, ``fundl.nn.transformer.exact_gelu``);
* ``fundl_before``: the same step traced with those two replaced by what they replaced
  (``jax.nn.dot_product_attention`` with ``implementation="xla"``, ``jax.nn.gelu(approximate=False)``): the A/B
  of the two changes, in one process;
* ``nanogpt`` (with ``--nanogpt DIR`` or ``$NANOGPT_DIR``): nanoGPT's ``GPT`` and ``configure_optimizers``,
  forward, backward, ``clip_grad_norm_``, ``step`` and ``zero_grad`` eagerly (as bench_nanogpt's PyTorch side),
  ``torch.set_num_threads(--torch-threads or the cores)``.

Each variant runs for ``--seconds`` per round, in ``--rounds`` rounds, the order rotated
(``benchmarks.harness.interleaved``), after a compiled (or warm-up) call.  Reported: ms per step (median over
rounds) and per-round ratios against ``fundl``.  docs/benchmarks.md ("Attention on CPU") records the runs.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

from benchmarks import harness

MODULE = "benchmarks.bench_gpt_step"
CONFIG = harness.CONFIGS / "shakespeare_char_gpt.toml"


def _config(overrides):
    from benchmarks.bench_nanogpt import BABY
    from fundl.run.config import load_config

    return load_config(CONFIG, list(BABY) + list(overrides))


def _before():
    """A context that traces with the functions the CPU lowerings replaced (restored on exit)."""
    import contextlib

    import jax

    import fundl.nn.attention as attention
    import fundl.nn.transformer as transformer

    @contextlib.contextmanager
    def patched():
        attend, gelu = attention.attend, transformer.exact_gelu
        attention.attend = lambda q, k, v, **kw: attend(q, k, v, **{**kw, "implementation": "xla"})
        transformer.exact_gelu = lambda x: jax.nn.gelu(x, approximate=False)
        try:
            yield
        finally:
            attention.attend, transformer.exact_gelu = attend, gelu

    return patched()


def fundl_step(config, before: bool):
    """One jitted training step on the first batch (compiled here, under ``_before`` if ``before``)."""
    return harness.config_step(config, _before() if before else None)[0]


def torch_step(config, directory, threads: int):
    """nanoGPT's eager training step on the same first batch."""
    import torch

    from benchmarks.bench_nanogpt import nanogpt_module
    from fundl.data import Loader
    from fundl.run.build import load_data

    torch.set_num_threads(threads or harness.cpu_count())
    module = nanogpt_module(directory)
    data = load_data(config)
    batch = Loader(data.train, config["training"]["batch_size"], seed=0, drop_last=True, prefetch=0).batch(0, 0)
    m, o = config["model"], config["optimizer"]
    torch.manual_seed(0)
    model = module.GPT(module.GPTConfig(block_size=config["data"]["seq_len"], vocab_size=data.num_classes,
                                        n_layer=m["layers"], n_head=m["heads"], n_embd=m["width"],
                                        dropout=m["dropout"], bias=m["bias"]))
    model.train()
    opt = model.configure_optimizers(o["weight_decay"], o["learning_rate"], (o["b1"], o["b2"]), "cpu")
    x, y = torch.from_numpy(batch["x"].astype("int64")), torch.from_numpy(batch["y"].astype("int64"))

    def call():
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o["clip_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    call()  # warm-up
    return call


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = harness.parser(__doc__, MODULE)
    harness.add_rounds(p, 6)
    p.add_argument("--seconds", type=float, default=3.0, help="seconds of steps per variant per round")
    p.add_argument("--nanogpt", default=os.environ.get("NANOGPT_DIR", ""),
                   help="a checkout of karpathy/nanoGPT (default $NANOGPT_DIR; none: no PyTorch side)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: the cores)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    harness.add_out(p)
    args = p.parse_args(argv)

    started = harness.start()
    config = _config(args.set)
    calls = {"fundl": fundl_step(config, False), "fundl_before": fundl_step(config, True)}
    if args.nanogpt:
        calls["nanogpt"] = torch_step(config, args.nanogpt, args.torch_threads)
    figures = harness.calls_per_round(calls, args.rounds, args.seconds, progress=True)
    ratios = {name: harness.median_ratio(figures[name], figures["fundl"]) for name in calls if name != "fundl"}
    record = harness.finish(started, MODULE, argv)
    record.update(overrides=args.set, seconds_per_step=figures, ratios_over_fundl=ratios)
    if args.nanogpt:
        import torch

        record["torch_threads"] = torch.get_num_threads()
    rows = []
    for name in calls:
        s = harness.spread(figures[name])
        rows.append((name, f"{s['median'] * 1e3:.1f}", f"{s['min'] * 1e3:.1f}", f"{s['max'] * 1e3:.1f}",
                     "1" if name == "fundl" else f"{ratios[name]:.2f}"))
    table = harness.markdown_table(["variant", "ms / step median", "min", "max", "time / fundl's (median of rounds)"],
                                   rows, "lrrrr")
    threads = f"; torch {record['versions'].get('torch', '?')}, {record['torch_threads']} threads" if args.nanogpt else ""
    markdown = harness.header(record) + threads + "\n\n" + table
    print(markdown)
    harness.write_result(args.out, "gpt_step", record, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
