"""The layout as docs/architecture.md describes it, read from the code: the library never imports
the run layer, no module imports another's private names, nothing edits ``sys.path``, tests never
import a script, the library stays off JAX's private modules, and every file of fundl/ has its
one line on the architecture page."""

import ast
import re

import pytest

from conftest import ROOT

FUNDL = ROOT / "fundl"
LIBRARY = sorted(p for p in FUNDL.rglob("*.py") if "run" not in p.relative_to(FUNDL).parts[:1])
EVERY_FILE = sorted(FUNDL.rglob("*.py"))


def imports(path):
    """``(line, module, names)`` of every import in ``path``, including those inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def where(path, line):
    return f"{path.relative_to(ROOT)}:{line}"


def test_the_library_never_imports_the_run_layer():
    bad = [where(p, line) for p in LIBRARY for line, module, names in imports(p)
           if module == "fundl.run" or module.startswith("fundl.run.") or (module == "fundl" and "run" in names)]
    assert LIBRARY and not bad, f"library modules importing fundl.run: {bad}"


def test_no_module_imports_another_modules_private_names():
    bad = [f"{where(p, line)} ({module}.{name})" for p in EVERY_FILE for line, module, names in imports(p)
           if module.startswith("fundl") for name in names if name.startswith("_") and not name.startswith("__")]
    assert not bad, f"private names imported across modules: {bad}"


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["fundl", "tests", "scripts", "benchmarks", "examples"])
def test_nothing_edits_sys_path(folder):
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).startswith("sys.path."):
                bad.append(where(path, node.lineno))
    assert not bad, f"sys.path edits: {bad}"


def test_tests_import_the_library_never_a_script():
    scripts = {p.stem for p in (ROOT / "scripts").glob("*.py")} | {p.stem for p in (ROOT / "examples").glob("*.py")}
    bad = [where(p, line) for p in sorted((ROOT / "tests").glob("*.py")) for line, module, _ in imports(p)
           if module.split(".")[0] in scripts | {"scripts", "examples"}]
    assert scripts and not bad, f"tests importing scripts: {bad}"


def test_the_library_uses_no_private_jax_module():
    """The multi-process start-up (fundl/run/distributed.py) may keep its guarded use of JAX's
    cluster detectors; the library may not."""
    bad = [where(p, line) for p in LIBRARY for line, module, names in imports(p)
           if module.startswith("jax._src") or (module == "jax" and "_src" in names)]
    assert not bad, f"jax._src in the library: {bad}"


def test_scripts_are_thin_wrappers_of_the_run_layer():
    for path in sorted((ROOT / "scripts").glob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= 20 and "from fundl.run" in text, path.name


def test_every_file_of_fundl_has_its_line_on_the_architecture_page():
    page = (ROOT / "docs" / "architecture.md").read_text()
    sections = re.split(r"^### ", page, flags=re.M)[1:]
    rows = {}
    for section in sections:
        package = re.match(r"`([\w.]+)`", section).group(1)
        folder = FUNDL.joinpath(*package.split(".")[1:])
        for name in re.findall(r"^\| `([\w/]+\.py)` \|", section, flags=re.M):
            rows[folder / name] = section
    missing = [str(p.relative_to(ROOT)) for p in EVERY_FILE if p not in rows and p.name != "__init__.py"
               or (p.name == "__init__.py" and p.parent == FUNDL and p not in rows)]
    stale = [str(p.relative_to(ROOT)) for p in rows if not p.is_file()]
    assert not missing and not stale, f"not on docs/architecture.md: {missing}; listed but gone: {stale}"
