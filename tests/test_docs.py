"""The documentation runs: every python block of README.md and docs/**/*.md, and the strict site build.

Pages are discovered (README.md and every markdown file under docs/), not listed, so a page added
later is checked without touching this file. How blocks run is documented in
docs/contributing-docs.md: a block with a top-level ``def test_...`` is a test file run by pytest
(one in-process run for all of them, so the bundled model loads once); every other block runs as a
script, in page order, sharing one namespace per page; ``<!-- docs-test: skip (reason) -->`` on the
line above a fence skips that block.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
SKIP = re.compile(r"^\s*<!--\s*docs-test:\s*skip\s*(?:\((?P<reason>[^)]*)\))?\s*-->\s*$")
IS_TEST = re.compile(r"^(?:async\s+)?def test_|^class Test", re.M)
# what a user's project sets in its ini for offline CPU runs; the repository's own pyproject sets the same
DOCS_INI = """[pytest]
nnsight_offline = true
nnsight_device = cpu
nnsight_hypothesis_profile = nnsight-ci
"""


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None  # the reason of a docs-test skip marker

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def is_test(self) -> bool:
        return bool(IS_TEST.search(self.code))


def blocks_of(page: Path, text: str | None = None) -> list[Block]:
    """The fenced code blocks of a markdown page; a fence closes only with the same character and at least as many."""
    lines = (page.read_text(encoding="utf-8") if text is None else text).splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m["fence"], (m["info"].split() or [""])[0].lower()
        prev = lines[i - 1] if i else ""
        skip = SKIP.match(prev)
        if SKIP.match(prev) is None and "docs-test" in prev:
            raise ValueError(
                f"{page}:{i}: malformed docs-test marker {prev.strip()!r}: write <!-- docs-test: skip (reason) -->"
            )
        if skip and not (skip["reason"] or "").strip():
            raise ValueError(f"{page}:{i}: a docs-test skip marker needs a reason: <!-- docs-test: skip (reason) -->")
        body, j = [], i + 1
        while j < len(lines):
            close = FENCE.match(lines[j])
            if (
                close
                and close["fence"][0] == fence[0]
                and len(close["fence"]) >= len(fence)
                and not close["info"].strip()
            ):
                break
            body.append(lines[j][len(m["indent"]) :] if lines[j].startswith(m["indent"]) else lines[j])
            j += 1
        out.append(Block(page, i + 1, lang, "\n".join(body) + "\n", skip["reason"].strip() if skip else None))
        i = j + 1
    return out


def pages() -> list[Path]:
    return sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])


def python_blocks(page: Path) -> list[Block]:
    return [b for b in blocks_of(page) if b.lang in ("python", "py") and b.skip is None]


def _id(page: Path) -> str:
    return str(page.relative_to(ROOT))


SCRIPT_PAGES = [p for p in pages() if any(not b.is_test for b in python_blocks(p))]


def test_blocks_are_found_with_their_language_skip_marker_and_nesting():
    text = "\n".join(
        [
            "```python",
            "x = 1",
            "```",
            "<!-- docs-test: skip (needs a GPU) -->",
            "```python",
            "y = 2",
            "```",
            "````markdown",
            "```python",
            "not = a block",
            "```",
            "````",
            "```bash",
            "make test",
            "```",
            "```python",
            "def test_a():",
            "    assert x == 1",
            "```",
        ]
    )
    found = blocks_of(ROOT / "README.md", text)
    assert [(b.line, b.lang, b.skip, b.is_test) for b in found] == [
        (1, "python", None, False),
        (5, "python", "needs a GPU", False),
        (8, "markdown", None, False),
        (13, "bash", None, False),
        (16, "python", None, True),
    ]
    assert found[2].code == "```python\nnot = a block\n```\n"
    with pytest.raises(ValueError, match="needs a reason"):
        blocks_of(ROOT / "README.md", "<!-- docs-test: skip -->\n```python\nx\n```")


def test_the_pages_have_python_blocks_to_run():
    """Discovery works: the README and the docs site hold runnable blocks, most of them tests."""
    every = [b for p in pages() for b in python_blocks(p)]
    assert {b.page.name for b in every} >= {"README.md", "quickstart.md", "notebook-to-test.md"}
    assert sum(b.is_test for b in every) >= 10


@pytest.mark.parametrize("page", SCRIPT_PAGES, ids=_id)
def test_script_blocks_of_the_page_run_in_order(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for n, block in enumerate(b for b in python_blocks(page) if not b.is_test):
        path = tmp_path / f"block_{n}_line_{block.line}.py"
        path.write_text(block.code, encoding="utf-8")  # nnsight reads a trace block's source from its file
        try:
            exec(compile(block.code, str(path), "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"the python block at {block.where} raised {type(exc).__name__}: {exc}") from exc


def test_test_blocks_of_every_page_pass(pytester):
    files: dict[str, str] = {}
    where: dict[str, str] = {}
    for page in pages():
        stem = re.sub(r"\W+", "_", _id(page).removesuffix(".md")).strip("_").lower()
        for block in python_blocks(page):
            if block.is_test:
                name = f"test_doc_{stem}_line{block.line}"
                files[name], where[name] = block.code, block.where
    pytester.makeini(DOCS_INI)
    pytester.makepyfile(**files)
    result = pytester.runpytest_inprocess("--snapshot-update", "-q")
    reports = [
        r for r in result.reprec.getreports("pytest_runtest_logreport") if r.when == "call" or r.outcome != "passed"
    ]
    bad = sorted({(where[r.nodeid.split(".py")[0]], r.nodeid, r.outcome) for r in reports if r.outcome != "passed"})
    ran = {r.nodeid.split(".py")[0] for r in reports if r.when == "call" and r.outcome == "passed"}
    detail = "\n".join(f"{w}: {nodeid} {outcome}" for w, nodeid, outcome in bad)
    assert not bad, (
        f"documentation blocks that did not pass (page:line of the block):\n{detail}\n\n{result.stdout.str()[-6000:]}"
    )
    assert ran == set(files), f"blocks whose tests never ran: {sorted(where[f] for f in set(files) - ran)}"
    assert result.ret == 0


def test_the_docs_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]' (make venv does)")
    pytest.importorskip(
        "mkdocstrings", reason="the docs extra is not installed: pip install -e '.[docs]' (make venv does)"
    )
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (tmp_path / "site" / "notebook-to-test" / "index.html").is_file()
    reference = (tmp_path / "site" / "reference" / "index.html").read_text()
    assert "normalized" in reference and "def patch" not in reference  # rendered docstrings, not source
    # docstrings' >>> examples are code blocks (docs/_ext/doctest_fences.py), not quotes
    assert "<blockquote>" not in reference
