"""The public facade: `fuse` and `calibrate`, as `import lc_onnx` offers them.

`fuse` is the graph pass (`lc_onnx.graph.pipeline.fuse`) when it is given nothing but the pass's own options,
and the calibrated fuse (`lc_onnx.calibration.fuse_calibrated`: fit, select within a budget, fuse) when
it is given calibration data, a metric, or fits to choose from. This module is the only place that
decides between the two; the pass itself never knows calibration exists.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import onnx

from lc_onnx.calibration import Calibration, calibrate, fuse_calibrated
from lc_onnx.graph.algebra import ChannelAffine
from lc_onnx.graph.options import FuseOptions
from lc_onnx.graph.pipeline import FuseResult
from lc_onnx.graph.pipeline import fuse as fuse_graph

__all__ = ["FuseResult", "calibrate", "fuse"]


def fuse(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    fits: Mapping[str, ChannelAffine] | Calibration | str | os.PathLike | None = None,
    data: Any = None,
    metric: Callable[..., float] | None = None,
    max_drop: float | None = None,
    calib_batches: int | None = None,
    fit_method: str | None = None,
    blocks: int | None = None,
    progress: bool = False,
    **options: Any,
) -> FuseResult:
    """Collapse every qualifying Linear -> linear activation -> Linear of `model` and verify the result.

    Args:
        model: a path to an `.onnx` file (its external data stays on disk) or an in-memory `ModelProto`.
        fits: a mapping `{step: ChannelAffine}` applies those per-channel maps `a ⊙ h + c` as given (the
            pass alone); a `Calibration` or a fits file (`lc-onnx calibrate -o`) is a set of candidates
            for the calibrated fuse below (with `data`: selected on its held-out feeds; without: all
            applied).
        data: calibration feeds (an iterable of `{input: array}` or a `CalibrationDataReader`): fit every
            block (or activation), keep the fits that keep the model within `max_error` (or `metric`
            within `max_drop`) on held-out feeds, and verify on those feeds; `threshold` and `feeds` are
            then not used (see `lc_onnx.calibration`).
        metric: `metric(run) -> float`, higher is better, where `run(feed)` returns the model's outputs;
            with `max_drop`, the budget instead of `max_error`.
        calib_batches: fit on the first N feeds of `data` and hold out the next ones (default: every
            fourth feed is held out).
        fit_method: `"block"` (the default with `data`): each block `Linear -> activation -> Linear`
            replaced by its least-squares linear map, fitted on the data (in order, padding excluded);
            `"channel"` (the default with `fits`): each activation replaced by a per-channel line.
        blocks: with the block fit, replace exactly this many blocks, the best by held-out error; the
            `max_error` budget then applies only when given.
        progress: progress bars on a terminal for the passes over the data.
        **options: the graph pass's own options, the fields of `lc_onnx.graph.options.FuseOptions`:
            `output`, `threshold`, `max_error`, `max_abs_error`, `verify`, `allow_growth`, `input_shapes`,
            `feeds`.

    Raises:
        UserError: the model cannot be read or written, or the options do not fit it.
        VerificationError: the fused model deviates more than `max_error` (nothing is written).
    """
    calibrated = (
        data is not None
        or metric is not None
        or (fits is not None and not isinstance(fits, Mapping))
        or fit_method is not None
        or blocks is not None
    )
    if not calibrated:
        return fuse_graph(model, FuseOptions(fits=fits, **options))
    return fuse_calibrated(
        model,
        FuseOptions(**options),
        data=data,
        fits=fits,
        metric=metric,
        max_drop=max_drop,
        calib_batches=calib_batches,
        fit_method=fit_method,
        blocks=blocks,
        gate_given="max_error" in options or "max_abs_error" in options,
        progress=progress,
    )
