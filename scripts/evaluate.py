#!/usr/bin/env python
"""Re-evaluate a run's newest valid checkpoint: ``fundl-evaluate`` (fundl/run/cli.py) as a script; see ``--help``."""

import sys

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    try:
        from fundl.run.hugepages import reexec_with_huge_pages
        reexec_with_huge_pages()
        from fundl.run.cli import evaluate_main, exit_with
    except KeyboardInterrupt:  # Ctrl-C while starting: one line and 130, as at any later moment
        from fundl.run.cli import interrupted_at_start_up
        sys.exit(interrupted_at_start_up())
    exit_with(evaluate_main())
