"""fundl's benchmarks and their shared harness (``benchmarks.harness``); see benchmarks/README.md.

Run each from the repository root as a module, ``python -m benchmarks.NAME``: the root is then on
``sys.path``, so the benchmarks import fundl and each other without path edits.  Not installed
with fundl (pyproject.toml packages only ``fundl``); the peers they compare need the ``bench`` extra.
"""
