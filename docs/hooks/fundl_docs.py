"""MkDocs hooks of the fundl site (mkdocs.yml, ``hooks:``).

1. **Notebooks.** Every ``notebooks/*.ipynb`` at the repository root joins
   the site as ``notebooks/<name>.ipynb``, as if it were in ``docs/``:
   mkdocs-jupyter renders it (as saved, never executed) at
   ``notebooks/<name>/``, the nav lists it as ``notebooks/<name>.ipynb`` and
   pages link to it as ``notebooks/<name>.ipynb``.  No copy, no symlink.
2. **Generated sections.** In a page, the text between
   ``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->`` is
   replaced at build time by ``GENERATORS[NAME]()``: the config reference
   from ``fundl.run.schema`` (``config-schema``) and the ``--help`` of
   ``scripts/train.py`` and ``scripts/evaluate.py`` (``train-help``,
   ``evaluate-help``: the parsers of ``fundl.run.cli``), so the site cannot
   drift from the code.  The committed text is kept current for readers of
   the Markdown too: ``python docs/hooks/fundl_docs.py`` rewrites it (with
   fundl importable: installed, or ``PYTHONPATH=.``), and
   ``tests/test_site.py`` fails when it is stale.
"""

from __future__ import annotations

import io
import os
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
SECTION = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- end generated: \2 -->)", re.DOTALL)


# ----------------------------------------------------------------------------- generators


def _schema_comments(source: str, schema: dict) -> dict[tuple[str, str], str]:
    """``(section, key) -> the comment on its line`` in fundl/run/schema.py's SCHEMA literal."""
    comments = {tok.start[0] - 1: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    pos = next((i for i, line in enumerate(lines) if line.startswith("SCHEMA")), 0)
    found = {}
    for section, entries in schema.items():
        pos = next((i for i in range(pos, len(lines)) if re.match(rf'\s*"{section}"\s*:\s*{{', lines[i])), pos)
        for key in entries:
            at = next((i for i in range(pos, len(lines)) if re.match(rf'\s*"{key}"\s*:', lines[i])), None)
            if at is not None:
                pos = at
                found[section, key] = comments.get(at, "")
    return found


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def config_schema() -> str:
    """One table per config section: key, default, allowed values, on resume, meaning."""
    from fundl.run import config as cfg
    from fundl.run import schema

    comments = _schema_comments(Path(schema.__file__).read_text(), cfg.SCHEMA)
    out = []
    for section, entries in cfg.SCHEMA.items():
        out += [f"### `[{section}]`", "", "| key | default | allowed | on resume | meaning |",
                "|---|---|---|---|---|"]
        for key, default in entries.items():
            if (section, key) in cfg.INT_OR_INT_LIST:
                allowed = "int > 0, or a list of them"
            elif (section, key) in cfg.CHOICES:
                allowed = " ".join(f"`{cfg.toml_value(c)}`" for c in cfg.CHOICES[section, key])
                allowed += " or an int ≥ 0" if (section, key) in cfg.CHOICE_OR_INT else ""
            elif (section, key) in cfg.AUTO_OR_FRACTION:
                allowed = '`"auto"` or a float in [0, 1)'
            elif (section, key) in cfg.AUTO_OR_INT:
                allowed = '`"auto"` or an int' + (" ≥ 0" if (section, key) in cfg.NON_NEGATIVE else " > 0")
            else:
                kind = cfg.type_name(default)   # the name config errors use
                bound = " > 0" if (section, key) in cfg.POSITIVE else " ≥ 0" if (section, key) in cfg.NON_NEGATIVE else ""
                allowed = kind + bound
            try:
                resume = cfg.resume_kind(section, key)
            except KeyError:
                resume = ""
            out.append(f"| `{key}` | `{_cell(cfg.toml_value(default))}` | {_cell(allowed)} | {resume} | "
                       f"{_cell(comments.get((section, key), ''))} |")
        out.append("")
    return "\n".join(out)


def _help(parser: str, script: str) -> str:
    """``python scripts/SCRIPT --help`` in a 96-column terminal, from the parser in fundl.run.cli."""
    from fundl.run import cli

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "96"  # argparse wraps the help to the terminal's width
    try:
        text = getattr(cli, parser)(prog=script).format_help()
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return f"```text\n{text.rstrip()}\n```\n"


GENERATORS = {
    "config-schema": config_schema,
    "train-help": lambda: _help("train_parser", "train.py"),
    "evaluate-help": lambda: _help("evaluate_parser", "evaluate.py"),
}


def fill(markdown: str, cache: dict | None = None) -> str:
    """``markdown`` with every generated section replaced by its generator's output."""
    cache = {} if cache is None else cache

    def replace(m: re.Match) -> str:
        name = m.group(2)
        if name not in GENERATORS:
            raise KeyError(f"unknown generated section {name!r}; known: {sorted(GENERATORS)}")
        if name not in cache:
            cache[name] = GENERATORS[name]().rstrip("\n") + "\n"
        return m.group(1) + "\n" + cache[name] + "\n" + m.group(4)

    return SECTION.sub(replace, markdown)


# ----------------------------------------------------------------------------- mkdocs events

_CACHE: dict[str, str] = {}


def on_pre_build(config, **kwargs):
    _CACHE.clear()  # once per build (mkdocs serve rebuilds)


def on_page_markdown(markdown, page, config, files, **kwargs):
    return fill(markdown, _CACHE) if "<!-- generated: " in markdown else markdown


try:  # mkdocs is absent when this file runs as a script without the docs extra
    from mkdocs.plugins import event_priority
except ImportError:  # pragma: no cover
    def event_priority(priority):
        return lambda fn: fn


@event_priority(100)  # before mkdocs-jupyter's on_files, which claims the .ipynb files
def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File

    for nb in sorted(NOTEBOOKS.glob("*.ipynb")):
        files.append(File(f"notebooks/{nb.name}", src_dir=str(ROOT), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files


def on_serve(server, config, builder, **kwargs):
    for path in (NOTEBOOKS, ROOT / "fundl", ROOT / "scripts"):
        if path.exists():
            server.watch(str(path))
    return server


# ----------------------------------------------------------------------------- command line

if __name__ == "__main__":
    # python docs/hooks/fundl_docs.py [--check]: rewrite (or check) the generated sections of docs/*.md
    stale = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text()
        new = fill(text, _CACHE)
        if new != text:
            stale.append(page.relative_to(ROOT))
            if "--check" not in sys.argv:
                page.write_text(new)
    print(("stale: " if "--check" in sys.argv else "rewrote: ") + (", ".join(map(str, stale)) or "nothing"))
    sys.exit(1 if stale and "--check" in sys.argv else 0)
