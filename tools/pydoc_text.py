"""English text that ships with Python, as one sentence per line, split by document into train and
held-out files: the unlabeled data of the post-training experiments (no download).

Documents are the entries of `pydoc_data.topics` (the language reference pages `help()` shows) and the
docstrings of a fixed list of standard-library modules (a module with its classes' and functions'
docstrings is one document). Paragraphs are cut into sentences; a line is kept when it reads like
prose (40-300 characters, at least six words, mostly letters, no doctest or grammar line). A document
goes to the held-out file when the CRC-32 of its name is divisible by `--every` (5: about a fifth), so the
split is fixed, independent of any seed, and no held-out sentence comes from a document trained on.

    python tools/pydoc_text.py --out runs/text      # runs/text/train.txt, runs/text/heldout.txt
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmath", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "dis", "doctest", "email", "enum", "fnmatch", "fractions", "functools", "getopt", "gettext",
    "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "importlib", "inspect",
    "io", "ipaddress", "itertools", "json", "linecache", "locale", "logging", "lzma", "mailbox", "math",
    "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pprint", "pydoc", "queue",
    "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib",
    "socket", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "traceback", "types", "typing", "unittest", "urllib.parse",
    "uuid", "warnings", "weakref", "xml.etree.ElementTree", "zipfile", "zoneinfo",
)  # fmt: skip
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
_WORD = re.compile(r"[A-Za-z]{2,}")


def documents() -> Iterator[tuple[str, str]]:
    """`(name, text)` of every document, in a fixed order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"topic:{name}", topics[name]
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        parts = [inspect.getdoc(module) or ""]
        for _, member in sorted(vars(module).items()):
            if (inspect.isclass(member) or inspect.isfunction(member)) and getattr(
                member, "__module__", ""
            ) == module.__name__:
                parts.append(inspect.getdoc(member) or "")
        yield f"module:{module_name}", "\n\n".join(parts)


def sentences(text: str) -> Iterator[str]:
    """The prose sentences of a document, whitespace normalised."""
    for paragraph in re.split(r"\n\s*\n", text):
        lines = paragraph.strip().splitlines()
        if not lines or any(line.lstrip().startswith((">>>", "...", "$")) for line in lines):
            continue
        if lines[0].startswith(("    ", "\t")) or "::=" in paragraph:
            continue  # code, grammar
        for sentence in _SENTENCE_END.split(" ".join(" ".join(lines).split())):
            letters = sum(c.isalpha() or c.isspace() for c in sentence)
            if (
                40 <= len(sentence) <= 300
                and len(_WORD.findall(sentence)) >= 6
                and letters >= 0.85 * len(sentence)
            ):
                yield sentence


def split(every: int = 5) -> tuple[list[str], list[str]]:
    """(train, held-out) sentences, each without repeats, by document."""
    train, held = {}, {}
    for name, text in documents():
        target = held if zlib.crc32(name.encode()) % every == 0 else train
        for sentence in sentences(text):
            target.setdefault(sentence, None)
    held_only = [s for s in held if s not in train]
    return list(train), held_only


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for train.txt and heldout.txt")
    parser.add_argument("--every", type=int, default=5, help="one document in EVERY is held out (default 5)")
    args = parser.parse_args(argv)
    train, held = split(args.every)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.txt").write_text("\n".join(train) + "\n")
    (args.out / "heldout.txt").write_text("\n".join(held) + "\n")
    print(f"{len(train)} train and {len(held)} held-out sentences in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
