"""Calibration data from scikit-learn's bundled digits (no download), for the bundled example models.

Use with `--data calibration/digits.py:FUNCTION`:

- `tokens`: feeds `{"tokens": float32[32, 16, 32]}` for the demo model (`lc-onnx demo`): each 8x8 digit
  upsampled to 16x32 (16 tokens of 32 features), standardised;
- `images`: feeds `{"input": float32[32, 3, S, S]}` for models trained by `lc-onnx finetune --dataset
  digits` (the same preprocessing: pixels / 16, bilinear resize, mean 0.5 / std 0.5, 3 channels);
  `S` is `LC_ONNX_IMG_SIZE` (default 16).

`accuracy` is a `--metric`: top-1 accuracy of a digits classifier on the 360 test digits.

The feeds are `LC_ONNX_CALIB_BATCHES` batches (default 8) of 32 digits, taken from the training part of the
fixed 80/20 split that `lc-onnx finetune` uses, so no test image is used for calibration.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

BATCH = 32


def _train_digits() -> np.ndarray:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    train, _ = train_test_split(range(len(data.target)), test_size=0.2, random_state=0, stratify=data.target)
    return data.images[np.asarray(train)].astype(np.float64) / 16.0


def resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of `[..., H, W]` (half-pixel centres, edges clamped: torch's `align_corners=False`)."""

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    r0, r1, rw = axis(images.shape[-2], height)
    c0, c1, cw = axis(images.shape[-1], width)
    rows = images[..., r0, :] * (1 - rw)[:, None] + images[..., r1, :] * rw[:, None]
    return rows[..., c0] * (1 - cw) + rows[..., c1] * cw


def _batches() -> int:
    return int(os.environ.get("LC_ONNX_CALIB_BATCHES", "8"))


def tokens() -> Iterator[dict[str, np.ndarray]]:
    """Feeds for the demo model's `tokens [batch, 16, 32]` input."""
    digits = resize(_train_digits(), 16, 32)
    digits = (digits - digits.mean()) / digits.std()
    for i in range(_batches()):
        yield {"tokens": digits[i * BATCH : (i + 1) * BATCH].astype(np.float32)}


def images(size: int | None = None, input_name: str = "input") -> Iterator[dict[str, np.ndarray]]:
    """Feeds `[batch, 3, size, size]` preprocessed like `lc-onnx finetune --dataset digits`."""
    size = size or int(os.environ.get("LC_ONNX_IMG_SIZE", "16"))
    digits = _train_digits()
    for i in range(_batches()):
        batch = resize(digits[i * BATCH : (i + 1) * BATCH], size, size)
        batch = (batch - 0.5) / 0.5
        yield {input_name: np.repeat(batch[:, None], 3, axis=1).astype(np.float32)}


def _test_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    _, test = train_test_split(range(len(data.target)), test_size=0.2, random_state=0, stratify=data.target)
    test = np.asarray(test)
    return data.images[test].astype(np.float64) / 16.0, data.target[test]


def accuracy(run) -> float:
    """A `--metric` for digits classifiers: top-1 accuracy on the 360 test digits (never used for fitting),
    preprocessed as `images`; the model's first output holds the class scores."""
    size = int(os.environ.get("LC_ONNX_IMG_SIZE", "16"))
    digits, labels = _test_digits()
    batch = (resize(digits, size, size) - 0.5) / 0.5
    feed = {"input": np.repeat(batch[:, None], 3, axis=1).astype(np.float32)}
    scores = next(iter(run(feed).values()))
    return float(np.mean(np.argmax(scores, axis=1) == labels))
