"""Calibration images from a directory, preprocessed the way timm models expect (resize, normalise).

Use with `--data calibration/imagefolder.py:load`. Settings come from the environment:

- `LC_ONNX_IMAGES`: the directory (searched recursively for .jpg/.jpeg/.png/.bmp/.webp; default
  `./images`);
- `LC_ONNX_IMG_SIZE` (default 224), `LC_ONNX_BATCH` (default 8), `LC_ONNX_CALIB_IMAGES` (how many images
  at most, default 64), `LC_ONNX_INPUT` (the model's input name, default `input`, what
  `lc_onnx.torch.export_onnx` writes);
- `LC_ONNX_MEAN` / `LC_ONNX_STD`: three comma-separated numbers (default ImageNet's,
  0.485,0.456,0.406 / 0.229,0.224,0.225).

Each image is resized so its shorter side is `size / 0.875` (timm's default crop_pct), centre-cropped
to `size x size`, scaled to [0, 1] and normalised per channel: `float32[batch, 3, size, size]`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
IMAGENET_MEAN, IMAGENET_STD = "0.485,0.456,0.406", "0.229,0.224,0.225"


def _triple(name: str, default: str) -> np.ndarray:
    values = [float(v) for v in os.environ.get(name, default).split(",")]
    if len(values) != 3:
        raise ValueError(f"{name} must be three comma-separated numbers")
    return np.asarray(values, np.float32)[:, None, None]


def preprocess(path: Path, size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = size / 0.875 / min(img.size)
        img = img.resize(
            (max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC
        )
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
        array = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0
    return (array - mean) / std


def load() -> Iterator[dict[str, np.ndarray]]:
    root = Path(os.environ.get("LC_ONNX_IMAGES", "images"))
    if not root.is_dir():
        raise FileNotFoundError(f"image directory {root} does not exist (set LC_ONNX_IMAGES)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES)
    files = files[: int(os.environ.get("LC_ONNX_CALIB_IMAGES", "64"))]
    if not files:
        raise FileNotFoundError(f"no images under {root}")
    size = int(os.environ.get("LC_ONNX_IMG_SIZE", "224"))
    batch = int(os.environ.get("LC_ONNX_BATCH", "8"))
    mean, std = _triple("LC_ONNX_MEAN", IMAGENET_MEAN), _triple("LC_ONNX_STD", IMAGENET_STD)
    name = os.environ.get("LC_ONNX_INPUT", "input")
    for start in range(0, len(files), batch):
        yield {name: np.stack([preprocess(p, size, mean, std) for p in files[start : start + batch]])}
