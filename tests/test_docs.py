"""Every ```python block of README.md, docs/*.md and docs/zh/*.md runs, one test per block (id file:line).

Blocks of one file share a namespace in order, like a notebook: a block may use
names an earlier block of its file defined.  A block preceded by an HTML comment
``<!-- skip: REASON -->`` is skipped with that reason (keep these rare:
downloads, runs of many minutes); one preceded by ``<!-- needs data: WHAT -->``
runs, and is skipped only if the data files are not on this machine
(``DataNotFoundError``), as are the later ``needs data`` blocks of its file.
"""

import re
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import ROOT

SKIP = re.compile(r"<!--\s*(skip|needs data):\s*(.*?)\s*-->")


class Block(NamedTuple):
    file: str   # relative to the repository root
    line: int   # of the opening fence, 1-based
    code: str   # the block's lines
    skip: str   # reason, or "" to run
    needs: str  # data it needs (skipped only when missing), or ""


def extract_blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """The ```python blocks of a markdown file, with their line and skip reason."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, prev = i, next((l for l in reversed(lines[:i]) if l.strip()), "")
            m = SKIP.fullmatch(prev.strip())
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                i += 1
            if i == len(lines):
                raise ValueError(f"{path}:{start + 1}: unclosed ```python block")
            kind, reason = m.groups() if m else ("", "")
            blocks.append(Block(str(path.relative_to(root)), start + 1, "\n".join(lines[start + 1:i]),
                                reason if kind == "skip" else "", reason if kind == "needs data" else ""))
        i += 1
    return blocks


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs" / "zh").glob("*.md"))]
BLOCKS = [b for f in DOCS for b in extract_blocks(f)]
_NAMESPACES: dict[str, dict] = {}   # file -> shared namespace
_DONE: dict[tuple[str, int], bool] = {}  # (file, line) -> ran without error
_MISSING: dict[str, str] = {}  # file -> why its first missing-data block was skipped


def _run(block: Block) -> str:
    """Run ``block`` in its file's namespace; return why it was skipped ("" if it ran).

    A ``needs data`` block whose files are missing counts as done (skipped):
    later ``needs data`` blocks of its file are skipped too (they use its
    names); other later blocks still run, and fail honestly if they use them."""
    from fundl.data.errors import DataNotFoundError

    if block.needs and block.file in _MISSING:
        _DONE[block.file, block.line] = True
        return _MISSING[block.file]
    ns = _NAMESPACES.setdefault(block.file, {"__name__": "__docs__"})
    try:
        padded = "\n" * block.line + block.code  # so tracebacks give the markdown file's line numbers
        exec(compile(padded, block.file, "exec"), ns)
    except DataNotFoundError as e:
        if not block.needs:
            _DONE[block.file, block.line] = False
            raise
        _DONE[block.file, block.line] = True
        _MISSING[block.file] = f"needs {block.needs}, not on this machine ({str(e)[:80]})"
        return _MISSING[block.file]
    except BaseException:
        _DONE[block.file, block.line] = False
        raise
    _DONE[block.file, block.line] = True
    return ""


def test_extractor_reads_lines_and_skip_reasons(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("text\n```python\na = 1\n```\n\n<!-- skip: downloads -->\n\n```python\nb = a\n```\n"
                  "```bash\nls\n```\n<!-- needs data: MNIST -->\n```python\nc = 2\n```\n")
    blocks = extract_blocks(md, root=tmp_path)
    assert [(b.line, b.code.strip(), b.skip, b.needs) for b in blocks] == [
        (2, "a = 1", "", ""), (8, "b = a", "downloads", ""), (15, "c = 2", "", "MNIST")]


def test_later_needs_data_blocks_of_a_file_skip_when_its_data_is_missing():
    file = "<a doc whose data is missing>.md"
    missing = "from fundl.data.errors import DataNotFoundError\nraise DataNotFoundError('no MNIST here')"
    assert "no MNIST here" in _run(Block(file, 1, missing, "", "MNIST"))
    assert "no MNIST here" in _run(Block(file, 5, "mnist.train", "", "MNIST"))   # not run: no NameError
    assert _run(Block(file, 9, "x = 1", "", "")) == ""                           # blocks without data still run
    with pytest.raises(NameError):
        _run(Block(file, 13, "mnist", "", ""))                                    # and fail if they use its names


@pytest.mark.slow
# xdist_group: a file's blocks share one namespace, so under `--dist loadgroup` (make test) they run on
# one worker in order, and no worker runs another's earlier blocks again.
@pytest.mark.parametrize("block", [pytest.param(b, marks=pytest.mark.xdist_group(b.file)) for b in BLOCKS],
                         ids=[f"{b.file}:{b.line}" for b in BLOCKS])
def test_code_block_runs(block, monkeypatch):
    if block.skip:
        pytest.skip(f"{block.file}:{block.line}: {block.skip}")
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for earlier in BLOCKS[:BLOCKS.index(block)]:  # the notebook so far (run here when run alone, with -k)
        if earlier.file != block.file or earlier.skip:
            continue
        if (earlier.file, earlier.line) not in _DONE:
            _run(earlier)
        if not _DONE[earlier.file, earlier.line]:
            pytest.fail(f"an earlier block of {block.file}, at line {earlier.line}, failed")
    skipped = _run(block)
    if skipped:
        pytest.skip(f"{block.file}:{block.line}: {skipped}")
