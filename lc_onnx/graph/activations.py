"""Activations between linear layers: multi-node patterns exporters write instead of one op, and the
`com.microsoft` activations onnxruntime's optimizer writes (matched read-only).

`match(node, tensor, graph_outputs, constants)` is called for each consumer `node` of the tensor `tensor`
that sits between two linear layers; it returns `(nodes, output, name)` when `node` belongs to an
element-wise function of `tensor` written as several nodes, where every node's outputs except `output`
are used only inside the pattern. Such steps are non-linear: they collapse only with a calibration fit.

Pattern: the largest *element-wise region* of `tensor`, grown from its consumers: nodes of
`ELEMENTWISE_OPS` whose inputs are `tensor`, outputs of region nodes, or constants that are one value or
one value per channel (last axis). The region must end in exactly one tensor (its only value used
outside) and contain something non-linear (`Erf`, `Tanh`, `Sigmoid`, ..., or a product of two values
that depend on `tensor`). Whatever the exporter's spelling, the result is `act(h)` per channel, which is
all calibration needs. This covers what the torch exporters write (checked by the tests):

- GELU (opsets below 20, both exporters): `0.5 · x · (1 + erf(x / √2))` as Div, Erf, Add, Mul, Mul;
- GELU with `approximate="tanh"`: Pow (or Mul·Mul), Mul, Add, Mul, Tanh, Add, Mul, Mul;
- SiLU / Swish: `x · sigmoid(x)` (Sigmoid, Mul), `x · sigmoid(β·x)` (Mul, Sigmoid, Mul), and
  transformers' quick GELU `x · sigmoid(1.702·x)`;
- Mish (TorchScript): Softplus, Tanh, Mul; a hand-written HardSwish `x · HardSigmoid(x)`.

The name is the function the region computes, recognised by evaluating it with `onnx.reference` on a
grid of values (`Gelu`, `GeluTanh`, `QuickGelu`, `Silu`, `Mish`, `HardSwish`), else `Swish` (a sigmoid
gate) or `Elementwise`. `CONTRIB_OPS` are onnxruntime's `com.microsoft` activations for that evaluator.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.reference.op_run import OpRun

from lc_onnx.graph.constant_eval import Constants
from lc_onnx.model.protos import MS_DOMAIN, is_default_domain

ELEMENTWISE_OPS = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Erf", "Tanh",
        "Sigmoid", "Softplus", "HardSigmoid", "HardSwish", "Relu", "Clip",
    }
)  # fmt: skip
# Ops that are non-linear on their own (a region of only Add/Mul/Div by constants is affine).
_NONLINEAR = ELEMENTWISE_OPS - {"Add", "Sub", "Mul", "Div", "Neg"}
MAX_NODES = 32


def _erf(t: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(t)


def _gelu(t):
    return 0.5 * t * (1.0 + _erf(np.asarray(t, np.float64) / math.sqrt(2.0)))


def _gelu_tanh(t):
    return 0.5 * t * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * t**3)))


def _sigmoid(t):
    return 1.0 / (1.0 + np.exp(-t))


class _ContribOp(OpRun):
    op_domain = MS_DOMAIN

    def _out(self, x: np.ndarray, value: np.ndarray) -> tuple[np.ndarray]:
        return (np.asarray(value, dtype=x.dtype),)


class Gelu(_ContribOp):
    """`com.microsoft::Gelu(X)`: the exact (erf) GELU."""

    def _run(self, x, **_schema_attrs):
        return self._out(x, _gelu(x))


class BiasGelu(_ContribOp):
    """`com.microsoft::BiasGelu(A, B)`: `Gelu(A + B)`, B a bias over the last axis (fc1's bias)."""

    def _run(self, a, b, **_schema_attrs):
        return self._out(a, _gelu(a + b))


class FastGelu(_ContribOp):
    """`com.microsoft::FastGelu(X, bias?)`: the tanh GELU of `X + bias`."""

    def _run(self, x, bias=None, **_schema_attrs):
        return self._out(x, _gelu_tanh(x if bias is None else x + bias))


class QuickGelu(_ContribOp):
    """`com.microsoft::QuickGelu(X, alpha=1.702)`: `X · sigmoid(alpha · X)`."""

    def _run(self, x, alpha=None, **_schema_attrs):
        alpha = 1.702 if alpha is None else alpha
        return self._out(x, x * _sigmoid(alpha * x))


CONTRIB_OPS = (Gelu, BiasGelu, FastGelu, QuickGelu)
# Single-node com.microsoft activations a site may have (input 0 is the hidden tensor; BiasGelu's and
# FastGelu's second input is a constant bias): non-linear, collapsible with a calibration fit.
CONTRIB_ACTIVATIONS = frozenset(op.__name__ for op in CONTRIB_OPS)


def match(
    node: gs.Node, tensor: gs.Tensor, graph_outputs: set[str], constants: Constants
) -> tuple[list[gs.Node], gs.Tensor, str] | None:
    """The activation pattern through `node` applied to `tensor`, or None."""
    nodes = _region(tensor, constants)
    if not nodes or all(n is not node for n in nodes):
        return None
    members = {id(n) for n in nodes}
    exits = {
        out.name: out
        for n in nodes
        for out in n.outputs
        if out.name in graph_outputs or any(id(c) not in members for c in out.outputs)
    }
    if len(exits) != 1 or not _is_nonlinear(nodes, constants):
        return None
    output = next(iter(exits.values()))
    return nodes, output, _name(nodes, tensor, output, constants)


def _region(x: gs.Tensor, constants: Constants) -> list[gs.Node]:
    """Element-wise nodes computing functions of `x` only, in a topological order found from `x`."""
    nodes: list[gs.Node] = []
    produced = {x.name}
    frontier = [x]
    while frontier and len(nodes) < MAX_NODES:
        grown = False
        for tensor in list(frontier):
            for consumer in tensor.outputs:
                if any(consumer is n for n in nodes) or not _joins(consumer, produced, constants):
                    continue
                nodes.append(consumer)
                produced.update(out.name for out in consumer.outputs)
                frontier.extend(consumer.outputs)
                grown = True
        if not grown:
            break
    return nodes


def _joins(node: gs.Node, produced: set[str], constants: Constants) -> bool:
    if node.op not in ELEMENTWISE_OPS or not is_default_domain(node.domain) or len(node.outputs) != 1:
        return False
    inputs = [t for t in node.inputs if t.name]
    return any(t.name in produced for t in inputs) and all(
        t.name in produced or channel_constant(t, constants) is not None for t in inputs
    )


def channel_constant(tensor: gs.Tensor, constants: Constants) -> np.ndarray | None:
    """The value of a constant that is one value or one value per channel of the last axis, else None."""
    value = constants.value(tensor)
    if value is None or not all(d == 1 for d in value.shape[:-1]):
        return None
    return value


def _is_nonlinear(nodes: list[gs.Node], constants: Constants) -> bool:
    for node in nodes:
        if node.op in _NONLINEAR:
            return True
        if node.op in ("Mul", "Div") and all(channel_constant(t, constants) is None for t in node.inputs):
            return True  # a product of two functions of x
    return False


_KNOWN = {
    "Gelu": _gelu,
    "GeluTanh": _gelu_tanh,
    "QuickGelu": lambda t: t * _sigmoid(1.702 * t),
    "Silu": lambda t: t * _sigmoid(t),
    "Mish": lambda t: t * np.tanh(np.log1p(np.exp(t))),
    "HardSwish": lambda t: t * np.clip(t / 6.0 + 0.5, 0.0, 1.0),
}
_GRID = np.linspace(-6.0, 6.0, 97)


def _name(nodes: list[gs.Node], x: gs.Tensor, output: gs.Tensor, constants: Constants) -> str:
    values = evaluate(nodes, x, output, constants, _GRID)
    if values is not None and values.shape == _GRID.shape:
        with np.errstate(all="ignore"):
            for name, fn in _KNOWN.items():
                if np.allclose(values, fn(_GRID), rtol=1e-4, atol=1e-4):
                    return name
    ops = {n.op for n in nodes}
    return "Swish" if {"Sigmoid", "Mul"} <= ops else "Elementwise"


def evaluate(
    nodes: list[gs.Node], x: gs.Tensor, output: gs.Tensor, constants: Constants, grid: np.ndarray
) -> np.ndarray | None:
    """The region's output on the 1-D `grid` (float32 arithmetic), by `onnx.reference`; None when a
    constant is per channel (the region is then not one function of a scalar) or evaluation fails."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    produced = {x.name} | {out.name for n in nodes for out in n.outputs}
    initializers = {}
    for node in nodes:
        for t in node.inputs:
            if t.name and t.name not in produced and t.name not in initializers:
                value = constants.value(t)
                if value is None or value.size != 1:
                    return None
                initializers[t.name] = onnx.numpy_helper.from_array(np.asarray(value), t.name)
    graph = onnx.helper.make_graph(
        [OnnxExporter.export_node(n) for n in nodes],
        "activation",
        [onnx.helper.make_tensor_value_info(x.name, onnx.TensorProto.FLOAT, [grid.size])],
        [onnx.helper.make_tensor_value_info(output.name, onnx.TensorProto.FLOAT, None)],
        list(initializers.values()),
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", constants.opset)])
    from onnx.reference import ReferenceEvaluator

    try:
        with np.errstate(all="ignore"):
            (result,) = ReferenceEvaluator(model, new_ops=list(CONTRIB_OPS)).run(
                None, {x.name: grid.astype(np.float32)}
            )
    except Exception:  # an op the evaluator does not know, or mismatched constant types: unnamed
        return None
    return np.asarray(result, dtype=np.float64)
