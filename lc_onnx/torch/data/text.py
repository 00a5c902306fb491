"""Unlabeled text for distillation: `--dataset text:FILE`, one example per line, tokenized by the
model's own tokenizer.

The held-out examples are fixed and independent of any seed: a line is held out when the CRC-32 of its
text is divisible by 10 (about a tenth; a file too small to hold one out that way holds out its last
line), the same rule as the graph pass's text calibration data (`lc_onnx.calibration.text`, whose
`split` this module offers). Batches are padded to their longest example (at most `max_length` tokens)
with the tokenizer's own padding, so the attention mask marks the real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from lc_onnx.calibration import text as calibration_text
from lc_onnx.calibration.text import split

__all__ = ["TextDataset", "read_lines", "split"]


def read_lines(path: str | Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file given as `--dataset text:FILE` (see
    `lc_onnx.calibration.text.read_lines`, which the graph pass's text data reads them with too)."""
    return calibration_text.read_lines(path, "dataset")


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
