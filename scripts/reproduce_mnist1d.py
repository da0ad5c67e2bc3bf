#!/usr/bin/env python
"""Reproduce the MNIST-1D paper's table: ``fundl-reproduce-mnist1d`` (fundl/run/reproduce_mnist1d.py)
as a script; see ``--help``."""

import sys

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

from fundl.run.reproduce_mnist1d import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
