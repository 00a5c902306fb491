"""Unlabeled text for distillation: `--dataset text:FILE`, one example per line, tokenized by the
model's own tokenizer.

The held-out examples are fixed and independent of any seed: a line is held out when the CRC-32 of its
text is divisible by 10 (about a tenth; a file too small to hold one out that way holds out its last
line). Batches are padded to their longest example (at most `max_length` tokens) with the tokenizer's
own padding, so the attention mask marks the real tokens.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from lc_onnx.errors import UserError, one_line

HELD_OUT_EVERY = 10


def read_lines(path: str | Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file (surrounding whitespace stripped).

    Raises:
        UserError: the file is missing, unreadable, not UTF-8 text, or has no non-blank line.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{{dataset}} text:{p}: no such file", params=["dataset"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(
            f"{{dataset}} text:{p}: not a readable UTF-8 text file ({one_line(exc)})", params=["dataset"]
        ) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(
            f"{{dataset}} text:{p}: the file has no text (one example per line)", params=["dataset"]
        )
    return lines


def split(lines: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train, held-out) lines; see the module docstring."""
    held = [line for line in lines if zlib.crc32(line.encode()) % HELD_OUT_EVERY == 0]
    if not held or len(held) == len(lines):
        held = [lines[-1]]
    kept = set(held)
    return [line for line in lines if line not in kept], held


@dataclass
class TextDataset(Dataset):
    """Tokenized examples; `collate` pads a batch to `{input_ids, attention_mask, ...}` tensors."""

    encodings: list[dict[str, list[int]]]
    tokenizer: object

    @classmethod
    def from_lines(cls, lines: Sequence[str], tokenizer, max_length: int) -> TextDataset:
        encoded = tokenizer(list(lines), truncation=True, max_length=max_length)
        keys = list(encoded.keys())
        return cls([{k: encoded[k][i] for k in keys} for i in range(len(lines))], tokenizer)

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.encodings[index]

    def collate(self, batch: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer.pad(list(batch), return_tensors="pt"))
