"""The documentation site (mkdocs.yml) builds with ``mkdocs build --strict``, and strict means strict.

A broken link or anchor, a reference to an object no API page renders, a page
left out of the nav or a docstring griffe cannot parse fails the build; the
generated sections of docs/*.md (the config tables, the scripts' ``--help``)
match the code; ``fundl.nn.__all__`` lists every export, so the API page shows it.
"""

import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")
pytest.importorskip("mkdocs_jupyter")



def build(project: Path, site: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of ``project`` (a folder holding mkdocs.yml) into ``site``."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                          check=False, cwd=project, env=env, capture_output=True, text=True, timeout=300)


def page(site: Path, path: str) -> str:
    file = site / path / "index.html" if not path.endswith(".html") else site / path
    assert file.is_file(), f"the site has no page {path}"
    return file.read_text(encoding="utf-8")


@pytest.mark.slow
def test_site_builds_strict_with_guides_api_and_notebooks(tmp_path):
    """One build (a few tens of seconds), then what it must hold."""
    site = tmp_path / "site"
    done = build(ROOT, site)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert done.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(problems or [done.stdout + done.stderr])

    assert "make train" in page(site, "index.html")
    for guide in ["layers", "training", "configs", "data", "parallel", "fault_tolerance", "optimizers",
                  "ensembles", "privacy", "transforms", "benchmarks", "reproduction"]:
        page(site, guide)
    nn_page = page(site, "api/nn")
    for name in ["fundl.nn.dense", "fundl.nn.serial", "fundl.nn.Layer", "fundl.nn.lstm", "fundl.nn.remat.remat"]:
        assert f'id="{name}"' in nn_page, f"api/nn does not document {name}"
    assert 'id="fundl.train.loop.fit"' in page(site, "api/train")
    configs = page(site, "configs")
    assert "keep_checkpoints" in configs and "--allow-change" in configs  # generated at build time
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        page(site, f"notebooks/{notebook.stem}")  # rendered by mkdocs-jupyter, not executed

    # the Chinese quickstart (docs/zh/), and the language switch (extra.alternate) of every page linking it
    zh = page(site, "zh")
    assert "快速入门" in zh and "nn.serial" in zh and 'class="grid"' in zh
    for path in ["index.html", "layers", "api/nn", "notebooks/quickstart", "zh"]:
        folder = (site / path).parent if path.endswith(".html") else site / path
        links = dict((lang, (folder / href).resolve()) for href, lang in
                     re.findall(r'<a href="([^"]*)" hreflang="([^"]+)" class="md-select__link"', page(site, path)))
        assert links == {"en": site.resolve(), "zh": (site / "zh").resolve()}, f"{path}: language switch {links}"

    for html in sorted((site / "api").glob("*/index.html")):
        text = html.read_text()
        # a '>>>' example outside an "Examples:" section renders as nested block quotes
        assert "<blockquote>\n<blockquote>" not in text, f"{html.parent.name}: a doctest outside 'Examples:'"
        roles = re.findall(r":(?:func|class|mod|meth|attr|data|exc):", text)
        assert not roles, f"{html.parent.name}: Sphinx roles left unconverted: {roles[:3]}"


@pytest.mark.slow
def test_strict_build_fails_on_a_broken_link_anchor_or_reference(tmp_path):
    """The same config on a copy of the docs with three mistakes: the build fails and names each."""
    for part in ["mkdocs.yml", "docs", "scripts", "notebooks"]:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, tmp_path / part)
    for api in (tmp_path / "docs" / "api").glob("*.md"):  # small API pages: a faster build
        api.write_text(f"# {api.stem}\n\n::: fundl.losses\n" if api.stem == "fundl" else f"# {api.stem}\n")
    index = tmp_path / "docs" / "index.md"
    index.write_text(index.read_text() + "\n[gone](no_such_page.md), [anchor](layers.md#no-such-anchor), "
                     "[`x`][fundl.no_such_object]\n")
    done = build(tmp_path, tmp_path / "site")
    log = done.stdout + done.stderr
    assert done.returncode != 0, f"a broken link passed mkdocs build --strict:\n{log}"
    for mistake in ["no_such_page.md", "no-such-anchor", "fundl.no_such_object"]:
        assert mistake in log, f"the build did not report {mistake}:\n{log}"


def test_generated_sections_are_current():
    spec = importlib.util.spec_from_file_location("fundl_docs_hooks", ROOT / "docs" / "hooks" / "fundl_docs.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    cache: dict = {}
    stale = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if hooks.fill(p.read_text(), cache) != p.read_text()]
    assert not stale, (f"generated sections of {stale} are out of date with the code: "
                       f"run `python docs/hooks/fundl_docs.py` (the site build fills them in regardless)")


def test_nn_all_lists_every_export():
    from fundl import nn

    exported = {name for name, value in vars(nn).items() if not name.startswith("_") and not inspect.ismodule(value)}
    missing = sorted(exported - set(nn.__all__))
    assert not missing, f"add {missing} to fundl.nn.__all__ (fundl/nn/__init__.py): the API page shows only __all__"
    assert sorted(set(nn.__all__) - exported - {"init"}) == []
    assert len(nn.__all__) == len(set(nn.__all__))
