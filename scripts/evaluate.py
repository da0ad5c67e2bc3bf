#!/usr/bin/env python
"""Re-evaluate a run's latest valid checkpoint on its test split.

    python scripts/evaluate.py RUN_DIR

Exit codes: 0 done (one JSON line on stdout); 1 a checkpoint or data error
(no valid checkpoint, one that does not fit the config's model, missing data
files); 2 a bad command line or config.  Errors are one message on stderr;
set FUNDL_TRACEBACK=1 to see the traceback.
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def evaluate_run(run_dir: Path) -> dict:
    """The latest valid checkpoint of ``run_dir`` evaluated on the test split of its config's data."""

    from fundl import config as cfg
    from fundl.data import Loader
    from fundl import sweeps
    from fundl.experiment import initial_state, load_data, make_evaluator
    from fundl.train import checkpoint as ckpt
    from fundl.train.placement import single_device

    config = cfg.load_config(run_dir / "config.toml")
    t = config["training"]
    data = load_data(config)
    steps_per_epoch = len(Loader(data.train, t["batch_size"], drop_last=True, prefetch=0))
    model, _, template = initial_state(config, data, steps_per_epoch)
    with warnings.catch_warnings(record=True) as skipped:  # corrupt newer checkpoints, printed plainly
        warnings.simplefilter("always")
        path = ckpt.latest_valid(run_dir / "checkpoints")
    for w in skipped:
        print(f"warning: {w.message}", file=sys.stderr)
    if path is None:
        if (run_dir / "members").is_dir():
            raise ckpt.CheckpointError(f"{run_dir} is a sweep of separate runs: evaluate each of "
                                       f"{run_dir / 'members'}/<k>")
        raise ckpt.CheckpointError(f"no checkpoint in {run_dir / 'checkpoints'}")
    state, manifest = ckpt.restore(path, template)
    num_members = len(sweeps.members(config))
    results = make_evaluator(config, model, data, single_device(), num_members)(state)
    out = {"checkpoint": str(path), "step": manifest["step"],
           "test_accuracy": results["accuracy"], "test_loss": results["loss"]}
    if num_members > 1:  # the ensemble's prediction above; each member here
        out["members"] = [{"test_accuracy": m["accuracy"], "test_loss": m["loss"]} for m in results["members"]]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.toml").is_file():
        print(f"error: {run_dir} has no config.toml; is it a fundl run directory?", file=sys.stderr)
        return 2

    from fundl.experiment import report_error

    try:
        result = evaluate_run(run_dir)
    except Exception as e:  # noqa: BLE001 - known errors become one message and an exit code
        code = report_error(e)
        if code is None:
            raise
        return code
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
