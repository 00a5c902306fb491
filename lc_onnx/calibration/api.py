"""`calibrate` (statistics and fits) and the calibrated `fuse` (fits, selection, fuse, report)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np
import onnx

from lc_onnx.calibration import data as data_mod
from lc_onnx.calibration import fits as fits_mod
from lc_onnx.calibration import stats as stats_mod
from lc_onnx.calibration.fits import Calibration
from lc_onnx.calibration.least_squares import fuse_blocks
from lc_onnx.calibration.select import Budget, Metric, Selection, select
from lc_onnx.errors import UserError
from lc_onnx.graph import pipeline
from lc_onnx.graph.options import FuseOptions
from lc_onnx.graph.reasons import Kind
from lc_onnx.model import io

log = logging.getLogger(__name__)

ModelLike = str | os.PathLike | onnx.ModelProto
FIT_METHODS = ("block", "channel")


def calibrate(
    model: ModelLike,
    data: Any,
    *,
    calib_batches: int | None = None,
    output: str | os.PathLike | None = None,
) -> Calibration:
    """Stream `data` through `model` once and fit every replaceable activation per channel.

    Args:
        model: a path (weights stay on disk) or a `ModelProto`.
        data: an iterable of `{input name: np.ndarray}` or an onnxruntime `CalibrationDataReader`.
        calib_batches: use only the first N feeds.
        output: also write the fits as JSON here (for `lc-onnx fuse --fits`).

    Raises:
        UserError: the data is empty or does not fit the model's inputs.
    """
    loaded = io.as_loaded(model)
    _check_batches(calib_batches)
    stream = data_mod.take(data_mod.feeds(data, data_mod.input_specs(loaded.proto)), calib_batches)
    calibration = _fit(loaded, stream)
    if output is not None:
        calibration.save(output)
    return calibration


def _fit(loaded: io.LoadedModel, stream: Iterable) -> Calibration:
    start = time.perf_counter()
    finder = pipeline.site_finder(loaded)
    probes = stats_mod.probes_for(finder.sites(), finder.constants)
    del finder
    statistics = stats_mod.collect(loaded, probes, stream)
    log.info("calibrated %d step(s) in %.2f s", len(probes), time.perf_counter() - start)
    return fits_mod.from_statistics(statistics)


def _check_batches(calib_batches: int | None) -> None:
    if calib_batches is not None and calib_batches < 1:
        raise UserError("{calib_batches} must be >= 1", params=["calib_batches"])


def fuse_calibrated(
    model: ModelLike,
    options: FuseOptions,
    *,
    data: Any = None,
    fits: Calibration | str | os.PathLike | None = None,
    metric: Metric | None = None,
    max_drop: float | None = None,
    calib_batches: int | None = None,
    fit_method: str | None = None,
    blocks: int | None = None,
    gate_given: bool = True,
    progress: bool = False,
):
    """Fit, choose within the budget on held-out feeds, fuse with the chosen fits and verify on the
    held-out feeds. Of `options`, `output`, `max_error`, `max_abs_error`, `verify`, `allow_growth` and
    `input_shapes` are used.

    `fit_method` `"block"` (the default with `data` and no `fits`) replaces whole blocks by their
    least-squares linear maps (`least_squares`): `blocks` of them, the best by held-out error, or as many
    as keep the budget; with `blocks`, `max_error` gates the result only when `gate_given`. The report's
    sites then carry `least_squares` entries and the report a `calibration` summary.

    `"channel"` (the default with `fits`) fits each activation per channel (or reuses `fits`); the
    report's sites carry `calibration: {step: {op, fit_error, estimated_error, measured_error, decision,
    reason}}`. `progress`: progress bars on a terminal for the passes over the data."""
    if (metric is None) != (max_drop is None):
        raise UserError("{metric} and {max_drop} go together", params=["metric", "max_drop"])
    max_error, max_abs_error = options.max_error, options.max_abs_error
    if max_error < 0 or (max_drop is not None and max_drop < 0):
        raise UserError("{max_error} and {max_drop} must be >= 0", params=["max_error", "max_drop"])
    _check_batches(calib_batches)
    method = fit_method or ("channel" if fits is not None else "block")
    if method not in FIT_METHODS:
        raise UserError(f"{{fit_method}} {method!r}: expected one of {', '.join(FIT_METHODS)}",
                        params=["fit_method"])  # fmt: skip
    if method == "block" and fits is not None:
        raise UserError("{fits} are per-channel fits: use them with {fit_method} channel",
                        params=["fits", "fit_method"])  # fmt: skip
    if blocks is not None and (method != "block" or blocks < 1):
        raise UserError("{blocks} must be >= 1 and goes with {fit_method} block",
                        params=["blocks", "fit_method"])  # fmt: skip
    if method == "block" and data is None:
        raise UserError("the least-squares fit needs calibration {data}", params=["data"])
    loaded = io.as_loaded(model)
    budget = Budget(max_error=max_error, max_abs_error=max_abs_error, metric=metric, max_drop=max_drop)
    if method == "block":
        passes = data_mod.Passes(data, data_mod.input_specs(loaded.proto), calib_batches)
        return fuse_blocks(
            loaded, options, passes, budget, blocks=blocks, gate_given=gate_given, progress=progress
        )
    held: list = []
    if data is not None:
        stream, held = data_mod.fit_and_held(data, data_mod.input_specs(loaded.proto), calib_batches)
        if fits is None:
            calibration = _fit(loaded, stream)
        else:
            for _ in stream:  # fits given: the data only supplies held-out feeds
                pass
    if fits is not None:
        calibration = fits if isinstance(fits, Calibration) else fits_mod.load(fits)
    elif data is None:
        raise UserError("calibrated fuse needs data (or fits)")
    if data is not None and not held:
        raise UserError(
            "no held-out calibration feeds for the selection: give at least 4 batches, or more than "
            "{calib_batches}",
            params=["calib_batches"],
        )
    if held or metric is not None:
        selection = select(loaded, calibration, held, budget, allow_growth=options.allow_growth)
        chosen = calibration.affines(selection.accepted)
    else:
        selection, chosen = None, calibration.affines()
    gate, abs_gate = max_error, max_abs_error
    if selection is not None:  # the exact-only model's float rounding is always allowed
        gate = max(max_error, selection.baseline.worst_rel_l2)
        abs_gate = None if max_abs_error is None else max(max_abs_error, selection.baseline.worst_max_abs)
    if metric is not None:
        gate, abs_gate = float("inf"), None  # the metric decided; output errors are still reported
    source = loaded.path if loaded.path is not None else loaded.proto
    result = pipeline.fuse(
        source,
        replace(
            options, threshold=0.0, max_error=gate, max_abs_error=abs_gate, feeds=held or None, fits=chosen
        ),
    )
    annotate(result.report, calibration, selection)
    return result


def annotate(report, calibration: Calibration, selection: Selection | None) -> None:
    """Add `calibration` entries to the report's sites (and say why a fitted site was not collapsed)."""
    for site in report.sites:
        entries = {}
        for key, fit in calibration.fits.items():
            if key not in site.nodes:
                continue
            trial = selection.trial_of(key) if selection is not None else None
            entries[key] = {
                "op": fit.op,
                "fit_error": _num(fit.fit_error),
                "estimated_error": _num(fit.estimated_error),
                "measured_error": _num(trial.measured_error) if trial is not None else None,
                "decision": "applied" if (trial.accepted if trial else selection is None) else "rejected",
                "reason": str(trial.reason)
                if trial is not None
                else ("fits given" if selection is None else "not a candidate"),
            }
            if trial is not None and trial.metric is not None:
                entries[key]["metric"] = trial.metric
            if (
                site.decision == "skipped"
                and trial is not None
                and trial.reason is not None
                and trial.reason.kind is Kind.FIT_REJECTED
            ):
                site.reason = f"{fit.op} {key}: {trial.reason}"
                site.reason_kind = trial.reason.kind.value
        if entries:
            site.extra["calibration"] = entries


def _num(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)
