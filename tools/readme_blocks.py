"""Print the N-th ```bash code block of a Markdown file (0-based); CI and the tests run them as written."""

from __future__ import annotations

import re
import sys
from pathlib import Path

BLOCK = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.M | re.S)


def shell_blocks(text: str) -> list[str]:
    return [m.group(1) for m in BLOCK.finditer(text)]


if __name__ == "__main__":
    path, index = sys.argv[1], int(sys.argv[2])
    sys.stdout.write(shell_blocks(Path(path).read_text())[index])
