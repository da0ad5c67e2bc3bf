#!/usr/bin/env python
"""Train a model from a TOML config: ``fundl-train`` (fundl/run/cli.py) as a script; see ``--help``."""

import sys

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    try:
        from fundl.run.hugepages import reexec_with_huge_pages
        reexec_with_huge_pages()
        from fundl.run.cli import train_main, exit_with
    except KeyboardInterrupt:  # Ctrl-C while starting: one line and 130, as at any later moment
        from fundl.run.cli import interrupted_at_start_up
        sys.exit(interrupted_at_start_up())
    exit_with(train_main())
