"""Per-channel affine fits of activations, and their JSON file (`lc-onnx calibrate -o fits.json`).

A `Fit` replaces one activation step by `a ⊙ h + c`. Its quality numbers:

- `fit_error`: `‖y − (a⊙h + c)‖ / ‖y‖` over the calibration data (the activation's own relative error);
- `estimated_error`: that residual carried through the following linear layer(s), relative to their
  output, `sqrt(Σ_j SSE_j ‖W[j,:]‖²) / ‖z‖` — exact when residuals of different channels are
  uncorrelated; used to order candidates, never to accept one (the measured error does that).

File format (floats are written with Python's `repr`, so float64 values round-trip exactly):

```json
{"format": "lc-onnx-fits", "version": 1, "batches": 8,
 "fits": {"STEP": {"op": "Gelu", "channels": 3, "rows": 4096, "fit_error": 0.21,
                   "estimated_error": 0.05, "scale": [..], "shift": [..]}}}
```
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lc_onnx.calibration.stats import Statistics
from lc_onnx.errors import UserError
from lc_onnx.graph.algebra import ChannelAffine
from lc_onnx.model import files

FORMAT = "lc-onnx-fits"
VERSION = 1


@dataclass(frozen=True)
class Fit:
    """The fitted `scale ⊙ h + shift` of one activation step (keyed by `Step.key`)."""

    op: str
    scale: np.ndarray
    shift: np.ndarray
    rows: int
    fit_error: float
    estimated_error: float

    @property
    def affine(self) -> ChannelAffine:
        return ChannelAffine(np.asarray(self.scale, np.float64), np.asarray(self.shift, np.float64))

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "channels": int(self.scale.shape[0]),
            "rows": self.rows,
            "fit_error": _finite(self.fit_error),
            "estimated_error": _finite(self.estimated_error),
            "scale": [float(v) for v in self.scale],
            "shift": [float(v) for v in self.shift],
        }


@dataclass
class Calibration:
    """Fits for every measured step and how many batches made them."""

    fits: dict[str, Fit]
    batches: int

    def affines(self, keys=None) -> dict[str, ChannelAffine]:
        """`{step key: ChannelAffine}` for `fuse(fits=...)`; all fits, or those in `keys`."""
        return {k: f.affine for k, f in self.fits.items() if keys is None or k in keys}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "batches": self.batches,
            "fits": {k: f.to_dict() for k, f in self.fits.items()},
        }

    def save(self, path: str | os.PathLike) -> None:
        files.write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")


def from_statistics(stats: Statistics) -> Calibration:
    fits = {}
    for key, probe in stats.probes.items():
        moments = stats.moments[key]
        a, c, sse = moments.fit()
        y_energy = float(moments.energy_y().sum())
        z_energy = sum(stats.energy.get(name, 0.0) for name in probe.consumer_outputs)
        fits[key] = Fit(
            op=probe.op,
            scale=a,
            shift=c,
            rows=moments.n,
            fit_error=_ratio(float(sse.sum()), y_energy),
            estimated_error=_ratio(float((sse * probe.row_energy).sum()), z_energy),
        )
    return Calibration(fits, stats.batches)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no infinity


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return math.sqrt(num / den)
    return 0.0 if num == 0 else math.inf


def load(path: str | os.PathLike) -> Calibration:
    """Read a fits file; every problem with it is a one-line `UserError`."""
    p = Path(path)
    data = files.read_json(p, "fits file")
    if (
        not isinstance(data, Mapping)
        or data.get("format") != FORMAT
        or not isinstance(data.get("fits"), Mapping)
    ):
        raise UserError(f"{p}: not an lc-onnx fits file (written by `lc-onnx calibrate`)")
    if data.get("version") != VERSION:
        raise UserError(f"{p}: fits file version {data.get('version')!r}, this lc-onnx reads {VERSION}")
    fits = {}
    for key, entry in data["fits"].items():
        try:
            scale = np.asarray(entry["scale"], dtype=np.float64)
            shift = np.asarray(entry["shift"], dtype=np.float64)
            if scale.ndim != 1 or scale.shape != shift.shape or not np.all(np.isfinite(scale + shift)):
                raise ValueError("scale and shift must be finite lists of one length")
            fits[key] = Fit(
                str(entry["op"]), scale, shift, int(entry["rows"]),
                _number(entry["fit_error"]), _number(entry["estimated_error"]),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{p}: fit {key!r} is malformed ({exc})") from None
    return Calibration(fits, int(data.get("batches", 0)))


def _number(value: Any) -> float:
    return math.inf if value is None else float(value)
