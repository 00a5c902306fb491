"""Calibration data from a text file, for text encoders exported with their tokenizer's input names.

Use with `--data calibration/text.py:feeds`. Settings:

- `LC_ONNX_TEXT`: the text file, one example per line (required);
- `LC_ONNX_TOKENIZER`: the directory of the model's tokenizer (required; `transformers.AutoTokenizer`);
- `LC_ONNX_MAX_LENGTH` (128), `LC_ONNX_BATCH` (16), `LC_ONNX_CALIB_BATCHES` (16).

Each feed is one batch of consecutive lines tokenized with padding to the batch's longest line, as
int64 arrays named as the tokenizer's outputs (`input_ids`, `attention_mask`, `token_type_ids`, ...).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def feeds() -> Iterator[dict[str, np.ndarray]]:
    from transformers import AutoTokenizer

    text, tokenizer_dir = os.environ.get("LC_ONNX_TEXT"), os.environ.get("LC_ONNX_TOKENIZER")
    if not text or not tokenizer_dir:
        raise ValueError("set LC_ONNX_TEXT (a text file) and LC_ONNX_TOKENIZER (the tokenizer's directory)")
    lines = [line.strip() for line in Path(text).read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    batch = int(os.environ.get("LC_ONNX_BATCH", "16"))
    count = int(os.environ.get("LC_ONNX_CALIB_BATCHES", "16"))
    max_length = int(os.environ.get("LC_ONNX_MAX_LENGTH", "128"))
    for start in range(0, min(len(lines), batch * count), batch):
        encoded = tokenizer(
            lines[start : start + batch], padding=True, truncation=True, max_length=max_length
        )
        yield {name: np.asarray(values, dtype=np.int64) for name, values in encoded.items()}
