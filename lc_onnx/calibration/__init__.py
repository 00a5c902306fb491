"""Calibration: measure on real data how linear each activation is, and collapse within a budget.

`data` reads and checks feeds, `stats` streams them through onnxruntime keeping per-channel moments,
`fits` turns moments into affine fits (and their JSON file), `select` chooses the fits to apply by
measuring candidate models, `api` ties them together (`calibrate`, `fuse_calibrated`); `text` reads text
through a tokenizer into feeds.

The names below are imported on first use, so that reading a data module (the command line's flags
need `text`'s defaults) does not load the graph pass.
"""

from __future__ import annotations

import importlib

__all__ = ["Budget", "Calibration", "Fit", "Selection", "calibrate", "fuse_calibrated", "load_fits"]

_HOMES = {
    "calibrate": ("api", "calibrate"),
    "fuse_calibrated": ("api", "fuse_calibrated"),
    "Calibration": ("fits", "Calibration"),
    "Fit": ("fits", "Fit"),
    "load_fits": ("fits", "load"),
    "Budget": ("select", "Budget"),
    "Selection": ("select", "Selection"),
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'lc_onnx.calibration' has no attribute {name!r}")
    module, attr = _HOMES[name]
    return getattr(importlib.import_module(f"lc_onnx.calibration.{module}"), attr)
