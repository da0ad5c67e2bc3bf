"""The examples in fundl's docstrings run and show what they print (doctest, one test per module).

Examples assume ``import jax, jax.numpy as jnp, numpy as np`` and ``from fundl import nn, models``,
as the API reference says; an example that needs data files or a download is marked
``# doctest: +SKIP``.
"""

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import fundl

MODULES = sorted(m.name for m in pkgutil.walk_packages(fundl.__path__, "fundl.")
                 if ">>>" in Path(importlib.util.find_spec(m.name).origin).read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, monkeypatch, tmp_path):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fundl import models, nn

    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    globs = {"jax": jax, "jnp": jnp, "np": np, "nn": nn, "models": models}
    tests = [t for t in finder.find(module, name, globs={**vars(module), **globs}) if t.examples]
    assert tests, f"{name} mentions '>>>' but doctest found no examples"
    for test in tests:
        runner.run(test)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0, f"{failed} of {attempted} docstring examples of {name} failed (output above)"
