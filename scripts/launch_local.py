#!/usr/bin/env python
"""Start N training processes on this machine as one multi-process JAX run:
``fundl-launch-local`` (fundl/run/launch_local.py) as a script; see ``--help``."""

import sys

from fundl.run.launch_local import main

if __name__ == "__main__":
    sys.exit(main())
