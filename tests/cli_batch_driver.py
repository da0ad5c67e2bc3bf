"""Call ``fundl.run.cli.train_main`` in one process for many argument lists; used by the bad-input tests.

    python tests/cli_batch_driver.py CASES.json  ->  one JSON list on stdout: {"code", "stderr"} per case

CASES.json is a list of argument lists.  Each call's stderr is captured on its own; a call that
``sys.exit``s (argparse) reports that code.  One process for all cases: the command line's
validation runs before JAX loads, so hundreds of bad settings cost one interpreter start.
"""

import contextlib
import io
import json
import sys

from fundl.run.cli import train_main


def call(argv: list[str]) -> dict:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = train_main(argv)
        except SystemExit as e:
            code = e.code
    return {"code": code, "stderr": err.getvalue()}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    print(json.dumps([call(argv) for argv in cases]))
