#!/usr/bin/env python
"""Re-evaluate a run's latest valid checkpoint on its test split.

    python scripts/evaluate.py RUN_DIR
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.toml").is_file():
        print(f"error: {run_dir} has no config.toml; is it a fundl run directory?", file=sys.stderr)
        return 2

    import jax

    from fundl import config as cfg
    from fundl.data import Loader
    from fundl.experiment import initial_state, load_data
    from fundl.train import checkpoint as ckpt
    from fundl.train.loop import evaluate
    from fundl.train.step import make_eval_step

    config = cfg.load_config(run_dir / "config.toml")
    t = config["training"]
    data = load_data(config)
    steps_per_epoch = len(Loader(data.train, t["batch_size"], drop_last=True, prefetch=0))
    model, _, template = initial_state(config, data, steps_per_epoch)
    path = ckpt.latest_valid(run_dir / "checkpoints")
    if path is None:
        print(f"error: no checkpoint in {run_dir / 'checkpoints'}", file=sys.stderr)
        return 2
    state, manifest = ckpt.restore(path, template)
    eval_step = jax.jit(make_eval_step(model, compute_dtype=t["compute_dtype"]))
    results = evaluate(eval_step, state.params, state.model_state, data.test,
                       min(t["eval_batch_size"], len(data.test["y"])))
    print(json.dumps({"checkpoint": str(path), "step": manifest["step"],
                      "test_accuracy": results["accuracy"], "test_loss": results["loss"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
