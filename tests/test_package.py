"""The package as a user meets it: a light import and a README example that runs."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_is_light():
    code = ("import sys, fundl; heavy = [m for m in ('matplotlib', 'tqdm', 'mnist1d', 'torch', 'pandas') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_readme_example_runs_and_prints_what_it_claims():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Pure functions, plain pytrees\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(block.strip().splitlines()) <= 15
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "'dense_0': {'b': (128,), 'w': (784, 128)}" in out


def test_public_api_is_small_and_importable():
    import fundl

    assert len(fundl.__all__) <= 15
    for name in fundl.__all__:
        assert getattr(fundl, name) is not None
