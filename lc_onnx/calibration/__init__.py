"""Calibration: measure on real data how linear each activation is, and collapse within a budget.

`data` reads and checks feeds, `stats` streams them through onnxruntime keeping per-channel moments,
`fits` turns moments into affine fits (and their JSON file), `select` chooses the fits to apply by
measuring candidate models, `api` ties them together (`calibrate`, `fuse_calibrated`).
"""

from __future__ import annotations

from lc_onnx.calibration.api import calibrate, fuse_calibrated
from lc_onnx.calibration.fits import Calibration, Fit
from lc_onnx.calibration.fits import load as load_fits
from lc_onnx.calibration.select import Budget, Selection

__all__ = ["Budget", "Calibration", "Fit", "Selection", "calibrate", "fuse_calibrated", "load_fits"]
