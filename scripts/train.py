#!/usr/bin/env python
"""Train a model from a TOML config: ``fundl-train`` (fundl/run/cli.py) as a script; see ``--help``."""

import sys

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

from fundl.run.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
