"""Every relative link in README.md and docs/ points to a file that exists; the README links every doc."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs.markdown import DOCS, README, ROOT

FENCED = re.compile(r"^```.*?^```", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FILES = [README, *sorted(DOCS.rglob("*.md"))]


def links(path: Path) -> list[str]:
    """The link targets of a Markdown file, outside code blocks and code spans."""
    text = INLINE_CODE.sub("", FENCED.sub("", path.read_text()))
    return LINK.findall(text)


def relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files_that_exist(path):
    targets = [t for t in links(path) if relative(t)]
    missing = [t for t in targets if not (path.parent / t.split("#")[0]).exists()]
    assert not missing, f"{path.relative_to(ROOT)}: {missing}"


def test_links_are_found():
    assert "docs/fuse.md" in links(README) and "../README.md" in links(DOCS / "fuse.md")


def test_readme_links_every_doc():
    linked = {(ROOT / t.split("#")[0]).resolve() for t in links(README) if relative(t)}
    assert not [p.relative_to(ROOT) for p in DOCS.rglob("*.md") if p.resolve() not in linked]
