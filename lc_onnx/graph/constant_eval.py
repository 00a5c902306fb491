"""Values of constant tensors in a graphsurgeon graph: the one constant reader of the pass.

A tensor is constant when it is an initializer, the output of a `Constant` node, or computed from
constants only by a small subgraph of `FOLDABLE_OPS` (`Transpose`, `Reshape`, `Cast`, ... of constants),
which is evaluated with `onnx.reference` without touching the graph. Stored tensors are read from the
model's own `TensorProto`s through `io.read_tensor` (external data from the model's directory, memory-
mapped, whatever the working directory); graphsurgeon's copies of them are never loaded. Tensors the
rewrite creates are registered with `add` and read from memory.

A graph input is never constant, also when an initializer gives it a default (it can be overridden).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lc_onnx.model import io
from lc_onnx.model.protos import is_default_domain

log = logging.getLogger(__name__)

# Ops whose output is constant when all their inputs are (weights computed by small subgraphs).
FOLDABLE_OPS = frozenset(
    {
        "Identity", "Transpose", "Reshape", "Cast", "CastLike", "ConstantOfShape", "Unsqueeze", "Squeeze",
        "Flatten", "Mul", "Add", "Sub", "Div", "Neg", "Sqrt", "Reciprocal", "Concat", "Expand", "Gather",
        "Slice", "Shape", "Tile",
    }
)  # fmt: skip
MAX_FOLD_DEPTH = 16


def describe(node: gs.Node) -> str:
    """A node's name, or `Op(output)` for unnamed nodes, for reports and reasons."""
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs else "?"
    return f"{node.op}({out})"


class Constants:
    """Values of the constant tensors of one graph (see the module docstring).

    Args:
        graph: the graphsurgeon graph the tensors belong to.
        model: the `ModelProto` it was imported from; its stored tensors are the ones read.
        base_dir: the model's directory (external data).
        graph_inputs: names a caller can feed (graphsurgeon drops initializer-backed inputs from
            `graph.inputs`; those stay inputs here).
    """

    def __init__(
        self,
        graph: gs.Graph,
        model: onnx.ModelProto,
        base_dir: Path | None,
        graph_inputs: Iterable[str] = (),
    ) -> None:
        self._graph_inputs = {t.name for t in graph.inputs} | set(graph_inputs)
        self._base_dir = base_dir
        self.opset = opset_of(model)
        self._stored = _stored_tensors(model.graph)
        self._cache: dict[str, np.ndarray | None] = {}

    def is_graph_input(self, tensor: gs.Tensor) -> bool:
        return tensor.name in self._graph_inputs

    def value(self, tensor: gs.Tensor, depth: int = 0) -> np.ndarray | None:
        """The tensor's value, or None when it is not constant (or is a graph input)."""
        if tensor.name in self._cache:
            return self._cache[tensor.name]
        value = self._compute(tensor, depth)
        self._cache[tensor.name] = value
        return value

    def add(self, name: str, value: np.ndarray) -> gs.Constant:
        """A new constant tensor for the graph, known to this reader from now on."""
        self._stored.pop(name, None)
        self._cache[name] = value
        return gs.Constant(name, value)

    def forget(self, tensor: gs.Tensor) -> None:
        self._cache.pop(tensor.name, None)

    def _compute(self, tensor: gs.Tensor, depth: int) -> np.ndarray | None:
        if self.is_graph_input(tensor):
            return None
        stored = self._stored.get(tensor.name)
        if stored is not None and (isinstance(tensor, gs.Constant) or _is_constant_node_output(tensor)):
            return io.read_tensor(stored, self._base_dir)
        if isinstance(tensor, gs.Constant):  # created in memory (not read from the model)
            return np.asarray(tensor.values)
        if not tensor.inputs or depth > MAX_FOLD_DEPTH:
            return None
        node = tensor.inputs[0]
        if node.op == "Constant":
            return _attribute_value(node)
        if node.op not in FOLDABLE_OPS or not is_default_domain(node.domain):
            return None
        inputs = []
        for inp in node.inputs:
            if inp.name == "":
                inputs.append(None)
                continue
            value = self.value(inp, depth + 1)
            if value is None:
                return None
            inputs.append(value)
        return self._evaluate(node, inputs, tensor)

    def _evaluate(self, node: gs.Node, inputs: list, tensor: gs.Tensor) -> np.ndarray | None:
        from onnx.reference import ReferenceEvaluator
        from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

        proto = OnnxExporter.export_node(node)
        feeds = {name: value for name, value in zip(proto.input, inputs) if name}
        try:
            outputs = ReferenceEvaluator(proto, opsets={"": self.opset}).run(None, feeds)
        except Exception as exc:  # an odd constant subgraph is simply not foldable
            log.debug("cannot fold %s: %s", describe(node), exc)
            return None
        index = [out.name for out in node.outputs].index(tensor.name)
        return np.asarray(outputs[index])


def _stored_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto | onnx.SparseTensorProto]:
    """Initializers (dense and sparse) and `Constant(value=...)` tensors, by the tensor name they give."""
    stored: dict = {t.name: t for t in graph.initializer}
    stored.update((s.values.name, s) for s in graph.sparse_initializer)
    for node in graph.node:
        if node.op_type == "Constant" and is_default_domain(node.domain) and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    stored[node.output[0]] = attr.t
                elif attr.name == "sparse_value" and attr.HasField("sparse_tensor"):
                    stored[node.output[0]] = attr.sparse_tensor
    return stored


def _is_constant_node_output(tensor: gs.Tensor) -> bool:
    return len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant"


def _attribute_value(node: gs.Node) -> np.ndarray | None:
    """A `Constant` node's value from its scalar or list attributes (tensor values are stored tensors)."""
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):  # fmt: skip
        if key in node.attrs:
            return np.asarray(node.attrs[key], dtype=dtype)
    return None


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if is_default_domain(imp.domain):
            return int(imp.version)
    return 1
