"""Verification: the original and the fused model run in onnxruntime on the same feeds.

The two sessions never live at the same time (the original runs first, its outputs are kept, its session
is dropped), so peak memory is one model's weights plus the outputs. Errors accumulate over all feeds:
`max_abs` is the largest absolute difference, `rel_l2` is `||fused - original|| / ||original||` over all
elements of all feeds, in float64.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

import numpy as np

from lc_onnx import runtime
from lc_onnx.errors import UserError, VerificationError
from lc_onnx.report import OutputError, Verification


def run_all(
    source, feeds: Sequence[dict[str, np.ndarray]], *, fused: bool = False
) -> tuple[list[str], list[list[np.ndarray]]]:
    """Every output of the model for every feed; a run that fails is the input's fault for the original
    (wrong shapes or types in the feeds, an invalid graph) and a failed verification for the fused model."""
    session = runtime.make_session(source)
    names = [o.name for o in session.get_outputs()]
    try:
        results = [session.run(names, feed) for feed in feeds]
    except Exception as exc:
        if fused:
            raise VerificationError(
                f"onnxruntime cannot run the fused model: {_one_line(exc)}; nothing written"
            ) from None
        raise UserError(
            f"onnxruntime cannot run the model on the verification inputs: {_one_line(exc)}"
        ) from None
    del session
    gc.collect()
    return names, results


def compare(original, fused, feeds: Sequence[dict[str, np.ndarray]]) -> Verification:
    """Run both models (paths or serialized bytes) on `feeds` and measure the output differences."""
    names, expected = run_all(original, feeds)
    fused_names, actual = run_all(fused, feeds, fused=True)
    if fused_names != names:
        raise AssertionError(f"fused model outputs {fused_names} differ from the original's {names}")
    outputs = {}
    for k, name in enumerate(names):
        max_abs, diff_sq, ref_sq = 0.0, 0.0, 0.0
        for ref_out, got_out in zip((e[k] for e in expected), (a[k] for a in actual)):
            ref = np.asarray(ref_out, dtype=np.float64)
            got = np.asarray(got_out, dtype=np.float64)
            if ref.shape != got.shape:
                raise AssertionError(f"output {name!r}: fused shape {got.shape} != original {ref.shape}")
            diff = got - ref
            if diff.size:
                max_abs = max(max_abs, float(np.max(np.abs(diff))))
            diff_sq += float(np.sum(diff * diff))
            ref_sq += float(np.sum(ref * ref))
        rel = (
            float(np.sqrt(diff_sq) / np.sqrt(ref_sq))
            if ref_sq > 0
            else (0.0 if diff_sq == 0 else float("inf"))
        )
        outputs[name] = OutputError(max_abs=max_abs, rel_l2=rel)
    return Verification(outputs=outputs, feeds=len(feeds))


def _one_line(exc: BaseException) -> str:
    # onnxruntime spreads one message over several lines ("index: 0 Got: 2 Expected: 3").
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text.rstrip(".")[:400] or type(exc).__name__
