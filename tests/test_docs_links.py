"""The docs hold together: every relative link in README.md and docs/*.md resolves (the file exists,
and an ``#anchor`` is the GitHub slug of a heading, or an explicit anchor, of that file), and every
pointer from the tree to a doc names a file and a heading that exist. A pointer is written
docs/FILE.md followed by the heading in double quotes (a docs/FILE.md alone must at least exist); in
code and configs a mention of the README must name one of its headings the same way. The benchmark
block `make bench` regenerates lives in docs/performance.md. No server, no build: fast."""
from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINKED = [ROOT / "README.md", *DOCS]

# Where pointers to docs live: code, configs, the Makefile, scripts, and other Markdown files.
CODE_SUFFIXES = {".py", ".pbtxt", ".sh", ".cfg", ".lua", ".yml", ".yaml", ".toml", ".ini", ".tpl"}
CODE_NAMES = {"Makefile", "Dockerfile", "run"}
SKIP_DIRS = {".git", ".venv", "venv", "build", "node_modules", "__pycache__", ".pytest_cache", ".ruff_cache",
             ".mypy_cache", ".hypothesis", "shared"}

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
EXPLICIT_ANCHOR = re.compile(r"""<a\s+(?:id|name)=["']([^"']+)["']""")
INLINE_CODE = re.compile(r"`+[^`]*`+")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A heading in double quotes, escaped or not (a pointer inside a Python string literal), or in curly quotes.
_QUOTED = r"""(?:\\?"([\w`][^"\\\n]*)\\?"|“([\w`][^”\n]*)”)"""
DOC_POINTER = re.compile(r"docs/([\w.-]+\.md)(?:\s*,)?\s*(?:§\s*)?" + _QUOTED + "?")
README_POINTER = re.compile(r"\bREADME(?!\.md)(?:\s*,)?\s*(?:section\s*|§\s*)?" + _QUOTED + "?")
README_ANCHOR = re.compile(r"README\.md#([\w-]+)")


def _plain(text: str) -> str:
    """A heading as GitHub renders its text: links reduced to their text, code and emphasis marks gone."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    return text.replace("`", "").replace("*", "").strip()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", _plain(heading).lower()).replace(" ", "-")


def _prose_lines(path: Path):
    """(line number, line) of a Markdown file outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


@cache
def headings(path: Path) -> tuple[frozenset[str], frozenset[str]]:
    """(heading texts, anchors) of a Markdown file; repeated slugs get -1, -2 ... as on GitHub."""
    texts, anchors, seen = set(), set(), {}
    for _, line in _prose_lines(path):
        anchors.update(EXPLICIT_ANCHOR.findall(line))
        m = HEADING.match(line)
        if not m:
            continue
        text = m.group(2)
        texts.update({text, _plain(text)})
        s = slug(text)
        count = seen.get(s, 0)
        seen[s] = count + 1
        anchors.add(s if count == 0 else f"{s}-{count}")
    return frozenset(texts), frozenset(anchors)


def relative_links(path: Path):
    """(line number, target) of every relative link and image in a Markdown file's prose."""
    for n, line in _prose_lines(path):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                yield n, target


def link_problem(source: Path, target: str) -> str | None:
    """Why a relative link from ``source`` does not resolve, or None."""
    file_part, _, anchor = target.partition("#")
    dest = (source.parent / file_part).resolve() if file_part else source
    if not dest.exists():
        return f"{file_part}: no such file"
    if anchor:
        if dest.suffix != ".md" or dest.is_dir():
            return f"#{anchor}: anchors are checked in Markdown files only, {dest.name} is not one"
        if anchor not in headings(dest)[1]:
            return f"#{anchor}: no such heading in {dest.name}"
    return None


def tree_files():
    """Files of the repository that may point at docs (build outputs and virtual environments left out)."""
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            path = Path(top) / name
            if path == THIS:  # its docstring describes the pointer forms
                continue
            if path.suffix in CODE_SUFFIXES or name in CODE_NAMES or path.suffix == ".md":
                yield path


def pointer_problems(path: Path) -> list[str]:
    """Pointers in one file that name a missing doc or heading (in code, also README mentions with none)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return []
    code = path.suffix != ".md"
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in DOC_POINTER.finditer(line):
            doc = ROOT / "docs" / m.group(1)
            heading = m.group(2) or m.group(3)
            if not doc.is_file():
                out.append(f"{where}:{n}: docs/{m.group(1)}: no such doc")
            elif heading is not None and heading not in headings(doc)[0]:
                out.append(f"{where}:{n}: docs/{m.group(1)} has no heading {heading!r}")
        for m in README_ANCHOR.finditer(line):
            if m.group(1) not in headings(ROOT / "README.md")[1]:
                out.append(f"{where}:{n}: README.md#{m.group(1)}: no such heading in README.md")
        if code:
            for m in README_POINTER.finditer(line):
                heading = m.group(1) or m.group(2)
                if heading is None:
                    out.append(f"{where}:{n}: a README pointer without a heading: "
                               "point at docs/<file>.md \"<Heading>\"")
                elif heading not in headings(ROOT / "README.md")[0]:
                    out.append(f"{where}:{n}: README has no heading {heading!r}")
    return out


def test_docs_exist():
    names = {p.name for p in DOCS}
    for name in ("security.md", "formats.md", "gateway.md", "monitoring.md", "cascade.md", "engines.md",
                 "accuracy.md", "performance.md", "gpu.md"):
        assert name in names, f"docs/{name} is missing"


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    problems = [f"{path.relative_to(ROOT)}:{n}: ({target}) {why}"
                for n, target in relative_links(path) if (why := link_problem(path, target))]
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_doc_starts_with_a_title_and_a_paragraph(path):
    lines = [line for _, line in _prose_lines(path)]
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    assert first is not None and lines[first].startswith("# "), f"{path.name}: no '# Title' first"
    following = next((line for line in lines[first + 1:] if line.strip()), "")
    assert following and not following.startswith("#"), f"{path.name}: no paragraph under the title"


def test_pointers_name_existing_headings():
    problems = [p for path in tree_files() for p in pointer_problems(path)]
    assert not problems, "pointers to docs that do not resolve:\n" + "\n".join(problems)


def test_slugs_follow_github():
    assert slug("Where one request's time goes") == "where-one-requests-time-goes"
    assert slug("A/B: pick pipeline_int8 or pipeline_onnx") == "ab-pick-pipeline_int8-or-pipeline_onnx"
    assert slug("Cascade: edge or cloud") == "cascade-edge-or-cloud"
    assert slug("`make observe`") == "make-observe"


def test_the_checks_catch_breakage(tmp_path):
    """A broken file link, a broken anchor and pointers to a missing doc or heading are each reported."""
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\nText.\n\n## A section\n\n```\n## not a heading\n```\n")
    assert link_problem(doc, "doc.md#a-section") is None
    assert link_problem(doc, "#title") is None
    assert link_problem(doc, "missing.md")
    assert link_problem(doc, "doc.md#no-such-section")
    assert link_problem(doc, "#not-a-heading")
    code = tmp_path / "config.pbtxt"
    code.write_text('# tuned (docs/performance.md "CPU settings"), see docs/gpu.md\n')
    assert pointer_problems(code) == []
    code.write_text('# docs/performance.md "No such heading"\n# docs/nowhere.md "X"\n# (README)\n'
                    '# README "No such heading"\n')
    assert len(pointer_problems(code)) == 4, pointer_problems(code)


def test_benchmark_block_lives_in_the_performance_doc(tmp_path):
    """`make bench` (loadtest.bench --doc) rewrites the block between its markers in docs/performance.md."""
    bench = pytest.importorskip("loadtest.bench")
    assert bench.PERF_DOC == ROOT / "docs" / "performance.md"
    text = bench.PERF_DOC.read_text()
    assert text.count(bench.BLOCK_BEGIN) == 1 and text.count(bench.BLOCK_END) == 1
    assert text.index(bench.BLOCK_BEGIN) < text.index(bench.BLOCK_END)
    assert bench.BLOCK_BEGIN not in (ROOT / "README.md").read_text()
    head, tail = text.split(bench.BLOCK_BEGIN)[0], text.split(bench.BLOCK_END)[1]
    assert "## Benchmark" in head
    copy = tmp_path / "performance.md"
    copy.write_text(text)
    bench.update_doc("| new | report |", copy)
    new = copy.read_text()
    assert new == f"{head}{bench.BLOCK_BEGIN}\n| new | report |\n{bench.BLOCK_END}{tail}"
