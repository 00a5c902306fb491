"""What the graph tests check on every fused model, and the feeds they check it on."""

from __future__ import annotations

import numpy as np
import onnx

import lc_onnx
from lc_onnx.testing import op_types, ort_outputs, rel_l2

EXACT = 1e-5


def check_fused(
    model: onnx.ModelProto, feeds: dict, *, collapsed: int, ops: list[str], tol: float = EXACT, **kw
):
    result = lc_onnx.fuse(model, **kw)
    assert result.collapsed == collapsed, result.report.to_json()
    assert op_types(result.model) == ops
    onnx.checker.check_model(result.model, full_check=True)
    for got, want in zip(ort_outputs(result.model, feeds), ort_outputs(model, feeds)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert rel_l2(got, want) <= tol
    return result


def x2(d: int, n: int = 5, seed: int = 1) -> dict:
    return {"x": np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)}


def x3(d: int, shape=(3, 7), seed: int = 1) -> dict:
    return {"x": np.random.default_rng(seed).standard_normal((*shape, d)).astype(np.float32)}
