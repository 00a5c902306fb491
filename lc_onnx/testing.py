"""Helpers for tests: build small graphs in a few lines and compare models in onnxruntime.

Like `numpy.testing`, this ships with the package so every test directory (and users' own tests) can
use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lc_onnx.graph import verify
from lc_onnx.model import runtime


class GraphBuilder:
    """Accumulates nodes, initializers, inputs and outputs; `model()` returns the ModelProto.

    Weights are random normal scaled by `1/sqrt(d_in)` so activations stay O(1) through chains.
    """

    def __init__(self, seed: int = 0, dtype: type = np.float32) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    @property
    def elem_type(self) -> int:
        return helper.np_dtype_to_tensor_dtype(self.dtype)

    def fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def input(self, name: str, shape: Sequence[int | str | None], elem_type: int | None = None) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type or self.elem_type, list(shape)))
        return name

    def output(
        self, name: str, shape: Sequence[int | str | None] | None = None, elem_type: int | None = None
    ) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type or self.elem_type, shape))
        return name

    def init(self, name: str, value: np.ndarray, dtype: type | None = None) -> str:
        array = np.asarray(value, dtype=dtype or self.dtype)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def random(self, shape: Sequence[int], scale: float = 1.0) -> np.ndarray:
        return (scale * self.rng.standard_normal(tuple(shape))).astype(self.dtype)

    def node(self, op: str, inputs: Sequence[str], name: str | None = None, n_out: int = 1, **attrs) -> str:
        name = name or self.fresh(op.lower())
        outputs = [f"{name}_out"] + [f"{name}_out{i}" for i in range(1, n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=name, **attrs))
        return outputs[0]

    def gemm(
        self,
        x: str,
        d_in: int,
        d_out: int,
        *,
        trans_b: bool = True,
        bias: bool = True,
        name: str | None = None,
    ) -> str:
        name = name or self.fresh("fc")
        w = self.random((d_out, d_in) if trans_b else (d_in, d_out), 1 / np.sqrt(d_in))
        inputs = [x, self.init(f"{name}.weight", w)]
        if bias:
            inputs.append(self.init(f"{name}.bias", self.random((d_out,), 0.1)))
        return self.node("Gemm", inputs, name=name, transB=int(trans_b))

    def matmul(self, x: str, d_in: int, d_out: int, *, bias: bool = True, name: str | None = None) -> str:
        name = name or self.fresh("fc")
        y = self.node(
            "MatMul",
            [x, self.init(f"{name}.weight", self.random((d_in, d_out), 1 / np.sqrt(d_in)))],
            name=name,
        )
        if not bias:
            return y
        return self.node(
            "Add", [y, self.init(f"{name}.bias", self.random((d_out,), 0.1))], name=f"{name}/Add"
        )

    def conv1x1(
        self, x: str, d_in: int, d_out: int, *, spatial: int = 2, bias: bool = True, name: str | None = None
    ) -> str:
        """A 1x1 `Conv` (`nn.Conv2d(d_in, d_out, 1)` for `spatial=2`): weight `[d_out, d_in, 1, ...]`."""
        name = name or self.fresh("conv")
        w = self.random((d_out, d_in, *([1] * spatial)), 1 / np.sqrt(d_in))
        inputs = [x, self.init(f"{name}.weight", w)]
        if bias:
            inputs.append(self.init(f"{name}.bias", self.random((d_out,), 0.1)))
        return self.node("Conv", inputs, name=name, kernel_shape=[1] * spatial)

    def prelu(
        self, x: str, slope: float | np.ndarray, shape: Sequence[int] = (1,), name: str | None = None
    ) -> str:
        name = name or self.fresh("act")
        value = np.broadcast_to(np.asarray(slope), tuple(shape))
        return self.node("PRelu", [x, self.init(f"{name}.slope", value)], name=name)

    def batchnorm(self, x: str, d: int, name: str | None = None) -> str:
        name = name or self.fresh("bn")
        params = [
            self.init(f"{name}.scale", self.rng.uniform(0.5, 1.5, d)),
            self.init(f"{name}.bias", 0.1 * self.rng.standard_normal(d)),
            self.init(f"{name}.mean", 0.1 * self.rng.standard_normal(d)),
            self.init(f"{name}.var", self.rng.uniform(0.5, 1.5, d)),
        ]
        return self.node("BatchNormalization", [x, *params], name=name, epsilon=1e-5)

    def model(self, opset: int = 17, ir_version: int | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "test", self.inputs, self.outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        if ir_version is not None:
            model.ir_version = ir_version
        return model


def ort_outputs(model: onnx.ModelProto | str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run `model` (proto or path) in onnxruntime with basic optimizations."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    session = runtime.session(source, optimization="disable")
    return session.run(None, dict(feeds))


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """`||actual - expected|| / ||expected||` in float64 (the measure `verify` uses)."""
    return verify.measure([(actual, expected)]).rel_l2


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]
