"""The package as a user meets it: a light import and a README example that runs."""

import re
import subprocess
import sys

import pytest
from conftest import ROOT



def test_import_is_light():
    code = ("import sys, fundl; heavy = [m for m in ('matplotlib', 'tqdm', 'mnist1d', 'torch', 'pandas') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_readme_example_runs_and_prints_what_it_claims():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Pure functions, plain pytrees\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(block.strip().splitlines()) <= 15
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "'dense_0': {'b': (128,), 'w': (784, 128)}" in out


def test_readme_is_a_front_page_of_at_most_200_lines_with_one_results_and_one_speed_table():
    """The README points to the guides and docs/benchmarks.md for details; it has grown past its
    bound once already (a second results table, 216 lines)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; at most 200 (details go to docs/)"
    tables, section = {}, None
    for line in lines:
        if line.startswith("## "):
            section = line[3:]
        elif re.match(r"\|-+", line):  # a table's separator row
            tables[section] = tables.get(section, 0) + 1
    assert tables == {"Results": 1, "Speed": 1}, tables


def test_public_api_is_small_and_importable():
    import fundl

    assert len(fundl.__all__) <= 15
    for name in fundl.__all__:
        assert getattr(fundl, name) is not None


@pytest.mark.slow
def test_the_one_screen_mnist_model_reaches_the_accuracy_the_readme_claims():
    """README "fundl in one screen": the Keras/PyTorch quickstart MLP, 5 epochs, prints >= 97.5%
    (the figure its comment and the config table quote); skipped only when MNIST is not on this machine."""
    import pytest

    from fundl.data import mnist

    try:
        mnist.locate("mnist")
    except FileNotFoundError as e:
        pytest.skip(f"MNIST files not here: {e}")
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## fundl in one screen\n.*?<!-- needs data: [^>]*-->\n```python\n(.*?)```", readme, re.S)
    out = subprocess.run([sys.executable, "-c", block.group(1)], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    accuracy = float(re.search(r"test accuracy (\d\.\d+)", out).group(1))
    claimed = float(re.search(r"# (0\.\d{4})", block.group(1)).group(1))
    assert accuracy >= 0.975 and abs(accuracy - claimed) <= 0.002, (accuracy, claimed)
