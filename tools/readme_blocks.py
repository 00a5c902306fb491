"""Print the N-th ```bash code block of a Markdown file (0-based); CI and the tests run them as written."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

BLOCK = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.M | re.S)


def shell_blocks(text: str) -> list[str]:
    return [m.group(1) for m in BLOCK.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", type=Path, help="the Markdown file")
    parser.add_argument("index", type=int, help="which shell block, counting from 0")
    args = parser.parse_args(argv)
    sys.stdout.write(shell_blocks(args.path.read_text())[args.index])
    return 0


if __name__ == "__main__":
    sys.exit(main())
