"""Models the base-layer tests load and save."""

from __future__ import annotations

import onnx

from lc_onnx.testing import GraphBuilder


def big_model(d: int = 256) -> onnx.ModelProto:
    g = GraphBuilder()
    h = g.gemm(g.input("x", ["N", d]), d, d, name="fc1")  # 256 KiB weight: above wire.MIN_BYTES
    g.output(g.gemm(g.prelu(h, 1.0), d, 4, name="fc2"), ["N", 4])
    return g.model()
