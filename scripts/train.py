#!/usr/bin/env python
"""Train a model from a TOML config.

    python scripts/train.py --config configs/mnist1d_cnn.toml [--set training.epochs=3 ...]
                            [--run-dir runs/NAME] [--overwrite]
    python scripts/train.py --resume runs/NAME [--allow-change training.epochs --set training.epochs=6 ...]

A fresh run refuses a run directory that already holds a run; ``--overwrite``
moves that run aside (to RUN_DIR.old-<time>) first.  A run directory in use
by another live run is refused too (a lock names its pid).

``--resume RUN_DIR`` continues RUN_DIR from its newest valid checkpoint with
the config saved there (``--config`` may still be given).  Settings that
would change the rest of the run (schedule, learning rate, steps/epochs,
batch size, seed, data) must be confirmed with ``--allow-change KEY``; the
effect is printed.  Resuming is also automatic with ``training.resume =
true``: start fresh when there is no checkpoint, continue otherwise (suits
requeued jobs).

Exit codes: 0 done; 1 an error stopped the run (message on stderr: non-finite
loss, corrupt checkpoints, disk full, bad data or shapes, unwritable run
directory); 2 a bad command line or config, or a run directory that is in
use or holds another run; 130 / 143 stopped by SIGINT / SIGTERM after saving
a checkpoint (resume with the command printed).
Set FUNDL_TRACEBACK=1 to see the traceback of an error.

Several processes form one run when started by ``srun`` (SLURM), ``mpirun``
(Open MPI 4) or a Kubernetes indexed Job (JAX detects them; no flags
needed), by ``scripts/launch_local.py``, or with ``--coordinator``,
``--num-processes``, ``--process-id`` (see docs/parallel.md); process 0
prints on stderr how the run was formed.
"""

import argparse
import json
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from fundl import config as cfg  # noqa: E402
from fundl import distributed  # noqa: E402  (touches no JAX device before initialize)


def _config_path(args, p) -> str:
    """The config to load: --config, or RUN_DIR/config.toml for ``--resume RUN_DIR``."""
    if args.config:
        return args.config
    if isinstance(args.resume, str):
        saved = Path(args.resume) / "config.toml"
        if not saved.is_file():
            p.error(f"--resume {args.resume}: {saved} does not exist (not a fundl run directory?); "
                    f"give --config FILE as well")
        return str(saved)
    p.error("the following arguments are required: --config (or --resume RUN_DIR)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML config file (see configs/); default with --resume RUN_DIR: RUN_DIR/config.toml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable); VALUE is parsed as TOML")
    p.add_argument("--run-dir", help="where to write the run (default runs/<config name>)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue from the newest valid checkpoint of RUN_DIR (or of --run-dir)")
    p.add_argument("--overwrite", action="store_true",
                   help="a fresh run into a run directory that holds a run: move that run aside to "
                        "RUN_DIR.old-<time> (never deleted)")
    p.add_argument("--allow-change", action="append", default=[], metavar="SECTION.KEY",
                   help="on resume, accept a changed setting that alters the run's trajectory (schedule, "
                        "learning rate, steps/epochs, batch size, seed, data); repeatable; a section allows all its keys")
    p.add_argument("--sweep", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                   help="train one member per value (repeatable: the cartesian product); seeds and the learning "
                        "rate vary inside one compiled program, other settings run as separate runs "
                        "(RUN_DIR/members/<k>/); sets training.sweep")
    p.add_argument("--quiet", action="store_true", help="no progress bar or banner")
    distributed.add_arguments(p)
    args = p.parse_args(argv)
    if isinstance(args.resume, str) and args.run_dir and Path(args.resume).resolve() != Path(args.run_dir).resolve():
        p.error(f"--resume {args.resume} and --run-dir {args.run_dir} name different run directories")
    config_path = _config_path(args, p)
    if args.overwrite and args.resume:
        p.error("--overwrite starts afresh and --resume continues the run: choose one")
    if args.allow_change and not args.resume:
        p.error("--allow-change applies to a resumed run: add --resume")

    overrides = list(args.set) + (["training.resume=true"] if args.resume else [])
    overrides += [f"training.sweep={json.dumps(args.sweep)}"] if args.sweep else []
    overrides += ["training.progress=false"] if args.quiet else []
    try:
        config = cfg.load_config(config_path, overrides)
    except cfg.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or (args.resume if isinstance(args.resume, str) else None) \
        or str(Path("runs") / Path(config_path).stem)

    try:  # multi-process set-up (flags, FUNDL_*, or a launcher JAX detects) and fake CPU devices,
        # before anything touches JAX devices
        settings = distributed.initialize(distributed.settings_from(args))
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    launcher = distributed.describe_launcher(settings)
    if launcher and settings.process_id == 0:
        print(launcher, file=sys.stderr, flush=True)  # how the run was formed: srun, mpirun, flags, ...
    from fundl.experiment import published_reference, report_error, run  # heavy imports after validation
    from fundl.train.signals import TrainingInterrupted

    t0 = time.perf_counter()
    try:
        summary = run(config, run_dir, config_path=config_path, verbose=not args.quiet,
                      overwrite=args.overwrite, allow_changes=args.allow_change)
    except TrainingInterrupted as e:
        print(f"fundl: {e}", file=sys.stderr)  # names the checkpoint and the command that resumes
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - known errors become one message and an exit code
        code = report_error(e)
        if code is None:
            raise
        return code
    wall = time.perf_counter() - t0
    acc = summary["test_accuracy"]
    line = f"test accuracy {acc:.4f}, test loss {summary['test_loss']:.4f} after {summary['final_step']} steps"
    ref = published_reference(config)
    if ref:
        line += f" (published: {ref[1]:.2f}, {ref[0]})"
    print(line)
    if summary.get("skipped_updates"):
        print(f"{summary['skipped_updates']} updates skipped for non-finite gradients (training.nan_policy='skip')")
    print(f"{summary['examples_per_second']:.0f} train examples/s; {wall:.1f} s in all; run dir {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
