"""Verification: the original and the fused model run in onnxruntime on the same feeds, and the one
error measure every comparison in lc-onnx uses.

The two sessions never live at the same time (the original runs first, its outputs are kept, its session
is dropped), so peak memory is one model's weights plus the outputs. Errors accumulate over all feeds:
`max_abs` is the largest absolute difference, `rel_l2` is `||fused - original|| / ||original||` over all
elements of all feeds, in float64.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from lc_onnx.errors import UserError, VerificationError
from lc_onnx.graph.report import OutputError, Verification
from lc_onnx.model import runtime


def measure(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> OutputError:
    """`max_abs` and `rel_l2` of `actual` against `expected` over every `(actual, expected)` pair, in
    float64 (`rel_l2` is 0 when both are all zeros and infinite when only `expected` is)."""
    max_abs, diff_sq, ref_sq = 0.0, 0.0, 0.0
    for actual, expected in pairs:
        ref = np.asarray(expected, dtype=np.float64)
        got = np.asarray(actual, dtype=np.float64)
        if ref.shape != got.shape:
            raise AssertionError(f"compared arrays differ in shape: {got.shape} != {ref.shape}")
        diff = got - ref
        if diff.size:
            max_abs = max(max_abs, float(np.max(np.abs(diff))))
        diff_sq += float(np.vdot(diff, diff))
        ref_sq += float(np.vdot(ref, ref))
    rel = math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else (0.0 if diff_sq == 0 else math.inf)
    return OutputError(max_abs=max_abs, rel_l2=rel)


def output_errors(
    names: Sequence[str],
    expected: Sequence[Mapping[str, np.ndarray]],
    actual: Sequence[Mapping[str, np.ndarray]],
) -> Verification:
    """`measure` per output name over all runs (`expected[i]`, `actual[i]`: one run's outputs)."""
    outputs = {name: measure((a[name], e[name]) for e, a in zip(expected, actual)) for name in names}
    return Verification(outputs=outputs, feeds=len(expected))


def run_all(
    source, feeds: Sequence[Mapping[str, np.ndarray]], *, fused: bool = False
) -> tuple[list[str], list[dict[str, np.ndarray]]]:
    """Every output of the model for every feed; a run that fails is the input's fault for the original
    (wrong shapes or types in the feeds, an invalid graph) and a failed verification for the fused model."""
    session = runtime.session(source)
    names = [o.name for o in session.get_outputs()]
    if fused:
        results = [
            runtime.run(session, f, names, what="the fused model", on="the verification inputs",
                        error=VerificationError)
            for f in feeds
        ]  # fmt: skip
    else:
        results = [
            runtime.run(session, f, names, on="the verification inputs", error=UserError) for f in feeds
        ]
    del session
    gc.collect()
    return names, results


def compare(original, fused, feeds: Sequence[Mapping[str, np.ndarray]]) -> Verification:
    """Run both models (paths or serialized bytes) on `feeds` and measure the output differences."""
    names, expected = run_all(original, feeds)
    fused_names, actual = run_all(fused, feeds, fused=True)
    if fused_names != names:
        raise AssertionError(f"fused model outputs {fused_names} differ from the original's {names}")
    return output_errors(names, expected, actual)
