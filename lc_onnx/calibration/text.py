"""Text as calibration data: one example per line, tokenized by the model's own tokenizer.

`text:FILE` with a tokenizer directory (`transformers.AutoTokenizer`, loaded from disk) gives feeds of
`BATCH` lines each, padded to their longest line (at most `max_length` tokens), so the attention mask
marks the real tokens. Lines are batched in order of their length (as tokenizers' length bucketing
does), so a batch is padded little: on the MiniLM text, 2.3 times fewer positions than in file order. The held-out lines are fixed and independent of any seed, as `lc-onnx finetune`
holds them out: a line whose CRC-32 is divisible by `HELD_OUT_EVERY` (about a tenth; a file too small to
hold one out that way holds out its last line). Each model input takes the tokenizer output of the same
name; tokenizer outputs the model does not take are left out.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lc_onnx.errors import UserError, one_line

PREFIX = "text:"
HELD_OUT_EVERY = 10
BATCH = 32
DEFAULT_MAX_LENGTH = 128


def read_lines(path: str | Path, param: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file (surrounding whitespace stripped); errors name `param`.

    Raises:
        UserError: the file is missing, unreadable, not UTF-8 text, or has no non-blank line.
    """
    p = Path(path)
    spec = f"{{{param}}} {PREFIX}{p}"
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{spec}: no such file", params=[param]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{spec}: not a readable UTF-8 text file ({one_line(exc)})", params=[param]) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{spec}: the file has no text (one example per line)", params=[param])
    return lines


def split(lines: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train, held-out) lines; see the module docstring."""
    held = [line for line in lines if zlib.crc32(line.encode()) % HELD_OUT_EVERY == 0]
    if not held or len(held) == len(lines):
        held = [lines[-1]]
    kept = set(held)
    return [line for line in lines if line not in kept], held


def load_tokenizer(directory: str | Path) -> Any:
    """`transformers.AutoTokenizer` from a local directory (nothing is downloaded).

    Raises:
        UserError: transformers is not installed, or the directory holds no tokenizer.
    """
    try:
        import transformers
    except ImportError:
        raise UserError(
            "text calibration data needs transformers for the tokenizer: pip install 'lc-onnx[torch]'"
        ) from None
    path = Path(directory)
    if not path.is_dir():
        raise UserError(f"{{tokenizer}} {path}: no such directory", params=["tokenizer"])
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, ... for a directory without one
        raise UserError(
            f"{{tokenizer}} {path}: no tokenizer could be loaded ({one_line(exc, 200)})", params=["tokenizer"]
        ) from None


@dataclass
class TextData:
    """Lines of text and the tokenizer that turns them into feeds, split into fit and held-out lines."""

    train: list[str]
    held: list[str]
    tokenizer: Any
    max_length: int = DEFAULT_MAX_LENGTH

    @classmethod
    def from_files(
        cls, path: str | Path, tokenizer_dir: str | Path, max_length: int = DEFAULT_MAX_LENGTH
    ) -> TextData:
        if max_length < 1:
            raise UserError("{max_length} must be >= 1", params=["max_length"])
        train, held = split(read_lines(path, "data"))
        return cls(train, held, load_tokenizer(tokenizer_dir), max_length)

    def feeds(self, lines: Sequence[str], inputs: Mapping[str, np.dtype]) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of `BATCH` lines for a model with `inputs` (name -> dtype), lazily.

        Raises:
            UserError: a model input is not among the tokenizer's outputs.
        """
        tokens = self.tokenizer(list(lines), truncation=True, max_length=self.max_length)["input_ids"]
        by_length = [line for _, line in sorted(zip(map(len, tokens), lines), key=lambda t: t[0])]
        for start in range(0, len(by_length), BATCH):
            batch = self.tokenizer(
                by_length[start : start + BATCH],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="np",
            )
            missing = [name for name in inputs if name not in batch]
            if missing:
                raise UserError(
                    f"{{tokenizer}} gives {', '.join(batch.keys())}, not the model input {missing[0]!r}",
                    params=["tokenizer"],
                )
            yield {name: np.asarray(batch[name]).astype(dtype) for name, dtype in inputs.items()}
