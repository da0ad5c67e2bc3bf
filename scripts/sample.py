#!/usr/bin/env python
"""Print text sampled from a trained char_lm or gpt run: ``fundl-sample`` (fundl/run/sample.py) as a script.

    python scripts/sample.py RUN_DIR --prompt "ROMEO:" --tokens 500 [--temperature 0.8 --top-k 40 --seed 0]
"""

import sys

if __name__ == "__main__":  # before JAX: glibc reads its malloc tunables only at start (see fundl/run/hugepages.py)
    from fundl.run.hugepages import reexec_with_huge_pages
    reexec_with_huge_pages()

from fundl.run.sample import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
