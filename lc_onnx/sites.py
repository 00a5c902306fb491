"""Finding collapse sites in a graph, read-only.

A *linear layer* is a `Gemm` (`transA=0`, any `transB`/`alpha`/`beta`, optional `C`) or a `MatMul` with a
constant 2-D weight as its second input, optionally followed by an `Add` of a constant bias that
broadcasts on the last axis. Weights may be initializers, `Constant` nodes or small constant subgraphs
(`Transpose`, `Reshape`, `Cast`, ... of constants), which `Constants` evaluates without touching the graph.

A *site* is a linear layer whose output reaches one or more linear layers through a chain of *steps*
(`Identity`, `Dropout`, `PRelu`, `LeakyRelu`, `BatchNormalization` or a known non-linear activation).
Matching records everything that stands in the way of a collapse as `problems` (a graph output in the
middle, another consumer, a weight that is a graph input or shared outside the match, a non-float dtype);
whether the activation is linear enough is for `decide`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from lc_onnx import activations
from lc_onnx.constants import Constants, describe
from lc_onnx.reasons import Kind, Reason

log = logging.getLogger(__name__)

# Exactly affine on any data: identity or per-channel scale and shift.
STEP_OPS = ("Identity", "Dropout", "PRelu", "LeakyRelu", "BatchNormalization")
# Element-wise activations a site may have; linear only through calibration fits.
NONLINEAR_OPS = (
    "Relu", "Gelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus", "Softsign", "HardSigmoid",
    "HardSwish", "Mish", "Clip", "Erf", "ThresholdedRelu", "Swish",
)  # fmt: skip
FLOAT_TYPES = (np.float16, np.float32, np.float64)


@dataclass(frozen=True)
class Linear:
    """One linear layer `y = x @ W + b`, whatever its ONNX spelling.

    `nodes` is `(Gemm,)`, `(MatMul,)` or `(MatMul, Add)`; `weight`/`bias` are the graph tensors as the
    nodes consume them (for a Gemm with `transB=1` the weight tensor holds `W.T`).
    """

    nodes: tuple[gs.Node, ...]
    input: gs.Tensor
    output: gs.Tensor
    weight: gs.Tensor
    bias: gs.Tensor | None
    trans_b: bool = False
    alpha: float = 1.0
    beta: float = 1.0
    problems: tuple[Reason, ...] = ()

    @property
    def is_gemm(self) -> bool:
        return self.nodes[0].op == "Gemm"

    @property
    def name(self) -> str:
        return describe(self.nodes[0])

    def weight_matrix(self, constants: Constants) -> np.ndarray:
        """`W` as `[d_in, d_out]` in the weight's own dtype (alpha applied in float64 by the caller)."""
        w = constants.value(self.weight)
        return w.T if self.trans_b else w

    def shape(self, constants: Constants) -> tuple[int, int]:
        w = constants.value(self.weight)
        return (int(w.shape[1]), int(w.shape[0])) if self.trans_b else (int(w.shape[0]), int(w.shape[1]))

    def affine(self, constants: Constants):
        from lc_onnx import algebra

        w = np.asarray(self.weight_matrix(constants), dtype=np.float64) * self.alpha
        b = None
        if self.bias is not None:
            b = np.asarray(constants.value(self.bias), dtype=np.float64) * self.beta
            b = np.broadcast_to(b, (1, w.shape[1]) if b.ndim == 2 else (w.shape[1],)).reshape(-1)
        return algebra.linear(w, b)

    def param_count(self, constants: Constants) -> int:
        return sum(_size(t, constants) for t in (self.weight, self.bias) if t is not None)


@dataclass(frozen=True)
class Step:
    """One activation between two linear layers: a single node, or a multi-node pattern (`nodes[0]` reads
    `input`, the last one writes `output`). `kind`: identity, slope, batchnorm or nonlinear."""

    nodes: tuple[gs.Node, ...]
    kind: str
    op: str
    input: gs.Tensor
    output: gs.Tensor

    @classmethod
    def single(cls, node: gs.Node, kind: str) -> Step:
        return cls((node,), kind, node.op, node.inputs[0], node.outputs[0])

    @property
    def node(self) -> gs.Node:
        return self.nodes[0]

    @property
    def key(self) -> str:
        """Stable identifier of the step (calibration fits are keyed by it)."""
        return describe(self.nodes[0])

    def slopes(self, constants: Constants) -> np.ndarray | None:
        """Negative-side slopes of PRelu/LeakyRelu (None for other ops or a non-constant slope)."""
        if self.op == "LeakyRelu":
            return np.asarray([self.node.attrs.get("alpha", 0.01)], dtype=np.float64)
        if self.op == "PRelu":
            value = constants.value(self.node.inputs[1])
            return None if value is None else np.asarray(value, dtype=np.float64)
        return None

    def param_count(self, constants: Constants) -> int:
        if self.kind not in ("slope", "batchnorm"):
            return 0
        count = 0
        for tensor in self.node.inputs[1:]:
            if tensor.name and isinstance(tensor, gs.Constant) and _is_float(tensor.dtype):
                count += int(np.prod(tensor.shape))
        return count


@dataclass(frozen=True)
class Site:
    """A linear layer whose output reaches `consumers` (linear layers) through `steps`."""

    producer: Linear
    steps: tuple[Step, ...]
    consumers: tuple[Linear, ...]
    problems: tuple[Reason, ...] = field(default=())

    @property
    def hidden(self) -> gs.Tensor:
        return self.steps[-1].output if self.steps else self.producer.output

    @property
    def activation(self) -> str:
        return ",".join(step.op for step in self.steps) or "none"

    def node_names(self) -> list[str]:
        names = [describe(n) for n in self.producer.nodes]
        names += [describe(n) for step in self.steps for n in step.nodes]
        for consumer in self.consumers:
            names += [describe(n) for n in consumer.nodes]
        return names


def _size(tensor: gs.Tensor, constants: Constants) -> int:
    """Element count of a weight: from its value, else its static shape (a graph input), else 0."""
    value = constants.value(tensor)
    if value is not None:
        return int(value.size)
    shape = tensor.shape
    if shape is not None and all(isinstance(d, int) for d in shape):
        return int(np.prod(shape))
    return 0


def _is_float(dtype) -> bool:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return False
    return dt in [np.dtype(t) for t in FLOAT_TYPES] or dt.name == "bfloat16"


class SiteFinder:
    """Matches linear layers and sites in a graphsurgeon graph without changing it."""

    def __init__(self, graph: gs.Graph, constants: Constants) -> None:
        self.graph = graph
        self.constants = constants
        self._outputs = {t.name for t in graph.outputs}

    def sites(self) -> Iterator[Site]:
        for node in list(self.graph.nodes):
            if node.op in ("Gemm", "MatMul"):
                layer = self.linear(node)
                if layer is not None:
                    site = self._follow(layer)
                    if site is not None:
                        yield site

    def linear(self, node: gs.Node) -> Linear | None:
        """The linear layer starting at `node`, or None when `node` is not one."""
        if node.op == "Gemm":
            return self._gemm(node)
        if node.op == "MatMul":
            return self._matmul(node)
        return None

    def _weight_problems(self, node: gs.Node, tensor: gs.Tensor, role: str, users: tuple) -> list[Reason]:
        if self.constants.is_graph_input(tensor):
            return [Reason(Kind.GRAPH_INPUT, f"{role} {tensor.name!r} of {describe(node)} is a graph input")]
        others = [c for c in tensor.outputs if all(c is not u for u in users)]
        if others:
            return [
                Reason(
                    Kind.SHARED,
                    f"{role} {tensor.name!r} of {describe(node)} is shared with {describe(others[0])}",
                )
            ]
        return []

    def _is_weight(self, tensor: gs.Tensor) -> bool:
        return self.constants.is_graph_input(tensor) or self.constants.value(tensor) is not None

    def _gemm(self, node: gs.Node) -> Linear | None:
        if node.attrs.get("transA", 0) or len(node.inputs) < 2:
            return None
        x, w = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if not self._is_weight(w) or (c is not None and not self._is_weight(c)):
            return None
        problems = self._weight_problems(node, w, "weight", (node,))
        trans_b = bool(node.attrs.get("transB", 0))
        if c is not None:
            problems += self._weight_problems(node, c, "bias", (node,))
        if not problems:
            value = self.constants.value(w)
            if value.ndim != 2:
                return None
            problems += self._dtype_problems(node, value)
            d_out = value.shape[0] if trans_b else value.shape[1]
            if c is not None and not _broadcasts_to_row(self.constants.value(c).shape, d_out):
                problems.append(
                    Reason(
                        Kind.SHAPE,
                        f"bias of {describe(node)} has shape {self.constants.value(c).shape}, not a row",
                    )
                )
        return Linear(
            (node,), x, node.outputs[0], w, c, trans_b,
            float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0)), tuple(problems),
        )  # fmt: skip

    def _matmul(self, node: gs.Node) -> Linear | None:
        x, w = node.inputs[0], node.inputs[1]
        if not self._is_weight(w) or self.constants.value(x) is not None:
            return None
        problems = self._weight_problems(node, w, "weight", (node,))
        value = None if problems else self.constants.value(w)
        if value is not None:
            if value.ndim != 2:
                return None
            problems += self._dtype_problems(node, value)
        if x.shape is not None and len(x.shape) < 2:
            return None
        out = node.outputs[0]
        nodes: tuple[gs.Node, ...] = (node,)
        bias = None
        consumers = out.outputs
        if out.name not in self._outputs and len(consumers) == 1 and consumers[0].op == "Add":
            add = consumers[0]
            other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            bias_value = self.constants.value(other) if not self.constants.is_graph_input(other) else None
            d_out = value.shape[1] if value is not None else None
            if bias_value is not None and d_out is not None and _broadcasts_to_row(bias_value.shape, d_out):
                bias = other
                nodes = (node, add)
                problems += self._weight_problems(add, other, "bias", (add,))
                out = add.outputs[0]
        return Linear(nodes, x, out, w, bias, problems=tuple(problems))

    def _dtype_problems(self, node: gs.Node, value: np.ndarray) -> list[Reason]:
        if _is_float(value.dtype):
            return []
        return [Reason(Kind.DTYPE, f"{describe(node)} has dtype {value.dtype}, not floating point")]

    def _follow(self, layer: Linear) -> Site | None:
        steps: list[Step] = []
        problems = list(layer.problems)
        tensor = layer.output
        seen = set()
        while tensor.name not in seen:
            seen.add(tensor.name)
            if tensor.name in self._outputs:
                problems.append(
                    Reason(Kind.CONSUMER, f"{tensor.name!r} between the layers is a graph output")
                )
            consumers = list(tensor.outputs)
            linears = [
                lin
                for c in consumers
                if c.op in ("Gemm", "MatMul") and c.inputs and c.inputs[0] is tensor
                for lin in [self.linear(c)]
                if lin is not None
            ]
            if linears:
                others = [c for c in consumers if all(c is not lin.nodes[0] for lin in linears)]
                if others:
                    problems.append(
                        Reason(Kind.CONSUMER, f"{tensor.name!r} also feeds {describe(others[0])}")
                    )
                for lin in linears:
                    problems += lin.problems
                return Site(layer, tuple(steps), tuple(linears), tuple(dict.fromkeys(problems)))
            # A multi-node pattern can be found from several of its nodes: one step per output.
            found = {id(st.output): st for c in consumers if (st := self._step(c, tensor)) is not None}
            if len(found) != 1:
                return None
            step = next(iter(found.values()))
            others = [c for c in consumers if all(c is not n for n in step.nodes)]
            if others:
                problems.append(Reason(Kind.CONSUMER, f"{tensor.name!r} also feeds {describe(others[0])}"))
            steps.append(step)
            tensor = step.output
        return None

    def _step(self, node: gs.Node, tensor: gs.Tensor) -> Step | None:
        # Multi-node activations first: their first node may also be an activation op (Sigmoid of SiLU).
        pattern = activations.match(node, tensor, self._outputs, self.constants)
        if pattern is not None and len(pattern[0]) > 1:
            nodes, output, name = pattern
            return Step(tuple(nodes), "nonlinear", name, tensor, output)
        if not node.inputs or node.inputs[0] is not tensor or not node.outputs:
            return None
        extra_outputs_used = any(out.outputs or out.name in self._outputs for out in node.outputs[1:])
        op = node.op
        if op == "Identity":
            return Step.single(node, "identity")
        if op == "Dropout":
            training = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            if extra_outputs_used or (training is not None and not _is_false(self.constants.value(training))):
                return None
            return Step.single(node, "identity")
        if op == "PRelu":
            kind = "slope" if self.constants.value(node.inputs[1]) is not None else "nonlinear"
            return Step.single(node, kind)
        if op == "LeakyRelu":
            return Step.single(node, "slope")
        if op == "BatchNormalization":
            if extra_outputs_used or node.attrs.get("training_mode", 0):
                return None
            if any(self.constants.value(t) is None for t in node.inputs[1:5]):
                return None
            return Step.single(node, "batchnorm")
        if op in NONLINEAR_OPS and len(node.outputs) == 1:
            return Step.single(node, "nonlinear")
        return None


def _broadcasts_to_row(shape: tuple[int, ...], d: int) -> bool:
    """True when a tensor of `shape` broadcast against `[..., d]` adds one value per column."""
    dims = list(shape)
    if dims and dims[-1] not in (1, d):
        return False
    return all(x == 1 for x in dims[:-1])


def _is_false(value: np.ndarray | None) -> bool:
    return value is not None and not bool(np.asarray(value).any())


def rank_of(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)
