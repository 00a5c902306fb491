"""Reading the documentation: its Markdown files, their fenced code blocks and their command lines.

A helper for the tests in this folder (not a test module). Shell blocks are found with the same pattern
as `tools/readme_blocks.py`, which CI uses to run the README's set-up blocks.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

SHELL = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.M | re.S)
PYTHON = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def read(path: Path | str) -> str:
    """A documentation file's text, by path relative to the repository root (`docs/fuse.md`)."""
    return (ROOT / path).read_text()


def shell_blocks(text: str) -> list[str]:
    return [m.group(1) for m in SHELL.finditer(text)]


def python_blocks(text: str) -> list[str]:
    return [m.group(1) for m in PYTHON.finditer(text)]


def commands(block: str) -> list[list[str]]:
    """The block's commands as argument lists: continuation lines joined, comments and blank lines dropped."""
    joined = block.replace("\\\n", " ")
    return [argv for argv in (shlex.split(line, comments=True) for line in joined.splitlines()) if argv]
