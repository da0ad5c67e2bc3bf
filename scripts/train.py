#!/usr/bin/env python
"""Train a model from a TOML config.

    python scripts/train.py --config configs/mnist1d_cnn.toml [--set training.epochs=3 ...]
                            [--run-dir runs/NAME] [--resume]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from fundl import config as cfg  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="TOML config file (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable); VALUE is parsed as TOML")
    p.add_argument("--run-dir", help="where to write the run (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's latest valid checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar or banner")
    args = p.parse_args(argv)

    overrides = list(args.set) + (["training.resume=true"] if args.resume else [])
    overrides += ["training.progress=false"] if args.quiet else []
    try:
        config = cfg.load_config(args.config, overrides)
    except cfg.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or str(Path("runs") / Path(args.config).stem)

    from fundl.experiment import PUBLISHED, run  # heavy imports after validation

    t0 = time.perf_counter()
    summary = run(config, run_dir, config_path=args.config, verbose=not args.quiet)
    wall = time.perf_counter() - t0
    acc = summary["test_accuracy"]
    line = f"test accuracy {acc:.4f}, test loss {summary['test_loss']:.4f} after {summary['final_step']} steps"
    ref = PUBLISHED.get((config["data"]["name"], config["model"]["kind"]))
    if ref:
        line += f" (published: {ref[1]:.2f}, {ref[0]})"
    print(line)
    print(f"{summary['examples_per_second']:.0f} train examples/s; {wall:.1f} s in all; run dir {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
