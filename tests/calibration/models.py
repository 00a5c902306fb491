"""Small models and data for the calibration tests (built in a few lines with GraphBuilder)."""

from __future__ import annotations

import math

import numpy as np
import onnx

from lc_onnx.testing import GraphBuilder


def mlp(acts: list, dims: list[int], seed: int = 0, rank3: bool = False) -> onnx.ModelProto:
    """Layers `dims[0] -> dims[1] -> ...` (output `fc{n-1}_out`) with activation `acts[i]` after layer i: a float (one PRelu
    slope), an array (per-channel PRelu slopes) or an op name ("Gelu", "Silu" as Sigmoid+Mul, ...)."""
    g = GraphBuilder(seed)
    x = g.input("x", ["N", 5, dims[0]] if rank3 else ["N", dims[0]])
    for i, (d_in, d_out) in enumerate(zip(dims, dims[1:])):
        x = g.matmul(x, d_in, d_out, name=f"fc{i}") if rank3 else g.gemm(x, d_in, d_out, name=f"fc{i}")
        if i < len(acts):
            assert i < len(dims) - 2, "no activation after the last layer"
            act = acts[i]
            if isinstance(act, str) and act == "Silu":
                x = g.node("Mul", [x, g.node("Sigmoid", [x], name=f"act{i}")], name=f"act{i}/mul")
            elif isinstance(act, str):
                x = g.node(act, [x], name=f"act{i}")
            else:
                slope = np.asarray(act, np.float32)
                x = g.prelu(x, slope, shape=slope.shape or (1,), name=f"act{i}")
    g.output(x, ["N", 5, dims[-1]] if rank3 else ["N", dims[-1]])
    return g.model(opset=20)


def feeds(model: onnx.ModelProto, batches: int, rows: int = 16, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    value = model.graph.input[0]
    dims = [d.dim_value or rows for d in value.type.tensor_type.shape.dim]
    return [{value.name: rng.standard_normal(dims).astype(np.float32)} for _ in range(batches)]


def act_numpy(act, h: np.ndarray) -> np.ndarray:
    """The activation in float64 numpy, independent of onnxruntime."""
    if isinstance(act, str) and act == "Gelu":
        return 0.5 * h * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))
    if isinstance(act, str) and act == "Silu":
        return h / (1.0 + np.exp(-h))
    if isinstance(act, str) and act == "Tanh":
        return np.tanh(h)
    slope = np.asarray(act, np.float64)
    return np.where(h >= 0, h, slope * h)
