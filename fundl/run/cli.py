"""The command line: ``fundl-train`` and ``fundl-evaluate`` (also ``scripts/train.py`` and
``scripts/evaluate.py``, thin wrappers of :func:`train_main` and :func:`evaluate_main`).

This module imports nothing heavy: a command re-executes itself for huge pages
(``fundl.run.hugepages``), parses its flags and validates the config before
JAX loads.  Errors become one message and an exit code in ``fundl.run.errors``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fundl.run import distributed
from fundl.run.config import load_config
from fundl.run.errors import is_known, one_line_warnings, report_error
from fundl.run.interrupts import Interrupts, exit_with, held_while_loading, stopped_by_signal
from fundl.run.hugepages import reexec_with_huge_pages
from fundl.run.rundir import RunDirError

TRAIN_HELP = """Train a model from a TOML config.

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

Exit codes: 0 done; 2 bad input (a command line, config, sweep value or
dataset that cannot run, a model that does not fit the data, a run directory
that is in use or holds another run); 1 a failure while running (non-finite
loss, corrupt checkpoints, disk full, an unwritable run directory); 130 / 143
stopped by SIGINT / SIGTERM (during training after saving a checkpoint:
resume with the command printed).  An error is one line on stderr,
"fundl: error: ...", and at most one hint line; --debug (or FUNDL_DEBUG=1)
shows its traceback.

Several processes form one run when started by ``srun`` (SLURM), ``mpirun``
(Open MPI 4) or a Kubernetes indexed Job (JAX detects them; no flags
needed), by ``scripts/launch_local.py``, or with ``--coordinator``,
``--num-processes``, ``--process-id`` (see docs/parallel.md); process 0
prints on stderr how the run was formed.  Installed, this is ``fundl-train``.
"""

EVALUATE_HELP = """Re-evaluate a run's latest valid checkpoint on its test split.

    python scripts/evaluate.py RUN_DIR

Exit codes: 0 done (one JSON line on stdout); 1 a checkpoint or data error
(no valid checkpoint, one that does not fit the config's model, missing data
files); 2 bad input (a command line, config or dataset); 130 interrupted.
Errors are one line on stderr, "fundl: error: ...", and at most one hint line;
--debug (or FUNDL_DEBUG=1) shows the traceback.  Installed, this is ``fundl-evaluate``.
"""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors print as every other error does: one line and a hint, exit 2."""

    def error(self, message):
        print(f"fundl: error: {message}\nfundl: hint: {self.prog} --help lists the options", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------- train
def train_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of ``fundl-train`` (``prog``: the name its usage line shows)."""
    p = _Parser(prog=prog, description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also FUNDL_DEBUG=1)")
    distributed.add_arguments(p)
    return p


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


def train_main(argv=None) -> int:
    """``fundl-train``: parse ``argv``, validate the config, start the processes, run; the exit code.

    Every error, and an interrupt at any moment, becomes one message and an exit code
    (``fundl.run.errors``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # known before parsing, so that every error prints the same way
    where: dict = {}  # the run directory, once known: an error's hint may name what it keeps
    with one_line_warnings(debug), Interrupts() as interrupts:
        try:
            return _train(argv, where)
        except BaseException as e:  # noqa: BLE001 - every error becomes one message and an exit code
            interrupts.settle()
            if isinstance(e, SystemExit):
                raise
            # Ctrl-C outside the training loop (start-up, compiling, closing), also when it surfaced
            # as another error (an import it cut short)
            e = KeyboardInterrupt() if interrupts.received and not stopped_by_signal(e) else e
            if where.get("multi_process") and not is_known(e):
                raise  # a peer's failure: the multi-process exit hook (fundl.run.distributed) says so and exits at once
            return report_error(e, debug=debug, run_dir=where.get("run_dir"))


def _train(argv, where: dict) -> int:
    p = train_parser()
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
    run_dir = args.run_dir or (args.resume if isinstance(args.resume, str) else None) \
        or str(Path("runs") / Path(config_path).stem)
    config = load_config(config_path, overrides)
    # multi-process set-up (flags, FUNDL_*, or a launcher JAX detects) and fake CPU devices,
    # before anything touches JAX devices
    with held_while_loading():  # JAX's native libraries load here
        settings = distributed.initialize(distributed.settings_from(args))
    where.update(run_dir=run_dir, multi_process=settings.multi_process)
    launcher = distributed.describe_launcher(settings)
    if launcher and settings.process_id == 0:
        print(launcher, file=sys.stderr, flush=True)  # how the run was formed: srun, mpirun, flags, ...
    with held_while_loading():  # heavy imports after validation (Optax, Orbax, TensorStore)
        from fundl.run.experiment import run
        from fundl.run.summary import published_reference
        from fundl.train.compile_cache import enable_compilation_cache

    enable_compilation_cache()  # before the first compile: every program of the run is cached

    t0 = time.perf_counter()
    summary = run(config, run_dir, config_path=config_path, verbose=not args.quiet,
                  overwrite=args.overwrite, allow_changes=args.allow_change)
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


# -------------------------------------------------------------- evaluate
def evaluate_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The arguments of ``fundl-evaluate`` (``prog``: the name its usage line shows)."""
    p = _Parser(prog=prog, description=EVALUATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also FUNDL_DEBUG=1)")
    return p


def evaluate_main(argv=None) -> int:
    """``fundl-evaluate``: one JSON line of a run's test metrics on stdout; the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    with one_line_warnings(debug):
        try:
            args = evaluate_parser().parse_args(argv)
            run_dir = Path(args.run_dir)
            if not (run_dir / "config.toml").is_file():
                raise RunDirError(f"{run_dir} has no config.toml; is it a fundl run directory?")
            with held_while_loading():  # heavy imports after the check
                from fundl.run.evaluator import evaluate_run
                from fundl.train.compile_cache import enable_compilation_cache

            enable_compilation_cache()

            result = evaluate_run(run_dir)
        except Exception as e:  # noqa: BLE001 - every error becomes one message and an exit code
            return report_error(e, debug=debug)
        except KeyboardInterrupt as e:  # never a traceback
            return report_error(e, debug=debug)
    print(json.dumps(result))
    return 0


def interrupted_at_start_up() -> int:
    """Ctrl-C before :func:`train_main` / :func:`evaluate_main` began (importing, re-executing):
    the same one message as later, and 130 for the caller to exit with."""
    return report_error(KeyboardInterrupt())


# ------------------------------------------------------- console scripts
def fundl_train() -> None:
    """The ``fundl-train`` console script: huge pages first (before JAX), then :func:`train_main`."""
    try:
        reexec_with_huge_pages()
    except KeyboardInterrupt:
        sys.exit(interrupted_at_start_up())
    exit_with(train_main())


def fundl_evaluate() -> None:
    """The ``fundl-evaluate`` console script: huge pages first (before JAX), then :func:`evaluate_main`."""
    try:
        reexec_with_huge_pages()
    except KeyboardInterrupt:
        sys.exit(interrupted_at_start_up())
    exit_with(evaluate_main())
