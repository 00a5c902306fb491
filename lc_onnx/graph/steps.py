"""The steps of a site: what stands between (or right around) its linear layers, read-only.

A step is one node, or a multi-node activation pattern (`nodes[0]` reads `input`, the last node writes
`output`). Its `StepKind` says what it is to the algebra:

- `identity`: `Identity`, `Dropout` in inference mode;
- `reshape`: `Reshape`/`Flatten`/`Squeeze`/`Unsqueeze` that only regroup the leading axes (`reshapes`);
- `affine`: `Mul`/`Add`/`Sub`/`Div` by a constant scalar or a vector on the feature axis;
- `slope`: `PRelu` with a constant slope, `LeakyRelu` (linear when every slope is 1);
- `batchnorm`: `BatchNormalization` in inference mode with constant statistics;
- `nonlinear`: any other activation the pass knows (one op, an onnxruntime `com.microsoft` GELU, or a
  multi-node pattern from `activations`): linear only through a calibration fit.

`classify` finds the step a node makes of a tensor: multi-node patterns first, then per-feature
constants, then one classifier per op in `CLASSIFIERS`. A new step op is one entry there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np
import onnx_graphsurgeon as gs

from lc_onnx.graph import activations, reshapes
from lc_onnx.graph.algebra import ChannelAffine
from lc_onnx.graph.constant_eval import Constants, describe
from lc_onnx.model.protos import MS_DOMAIN, is_default_domain

# Element-wise activations a site may have; linear only through calibration fits.
NONLINEAR_OPS = (
    "Relu", "Gelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus", "Softsign", "HardSigmoid",
    "HardSwish", "Mish", "Clip", "Erf", "ThresholdedRelu", "Swish",
)  # fmt: skip
AFFINE_OPS = ("Mul", "Add", "Sub", "Div")


class StepKind(str, Enum):
    """What a step is to the collapse algebra."""

    IDENTITY = "identity"
    RESHAPE = "reshape"
    AFFINE = "affine"
    SLOPE = "slope"
    BATCHNORM = "batchnorm"
    NONLINEAR = "nonlinear"


@dataclass(frozen=True)
class Scope:
    """What matching reads besides the nodes themselves: constant values and the graph's outputs."""

    constants: Constants
    outputs: frozenset[str]

    def single_user(self, tensor: gs.Tensor) -> gs.Node | None:
        """The only node reading `tensor`, or None (several readers, none, or a graph output)."""
        if tensor.name in self.outputs or len(tensor.outputs) != 1:
            return None
        return tensor.outputs[0]


@dataclass(frozen=True)
class Step:
    """One step between (or around) linear layers. `feature_axis` is the feature axis as a negative
    index (-1 for Gemm/MatMul layers, `1 - rank` for convolutions)."""

    nodes: tuple[gs.Node, ...]
    kind: StepKind
    op: str
    input: gs.Tensor
    output: gs.Tensor
    feature_axis: int = -1

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

    def channel_affine(self, constants: Constants, d: int) -> ChannelAffine:
        """An affine, reshape or identity step as `a ⊙ h + c` over `d` features."""
        if self.kind in (StepKind.IDENTITY, StepKind.RESHAPE):
            return ChannelAffine.identity(d)
        if self.kind != StepKind.AFFINE:
            raise ValueError(f"{self.kind.value} step {self.key} has no exact affine form")
        data = self.input
        node = self.node
        other = node.inputs[1] if node.inputs[0] is data else node.inputs[0]
        v = channel_values(constants.value(other), self.feature_axis, d)
        op, first = node.op, node.inputs[0] is data
        if op == "Mul":
            return ChannelAffine(v, np.zeros(d))
        if op == "Div":
            return ChannelAffine(1.0 / v, np.zeros(d))
        if op == "Add":
            return ChannelAffine(np.ones(d), v)
        # Sub: h - v, or v - h
        return ChannelAffine(np.ones(d), -v) if first else ChannelAffine(-np.ones(d), v)


def channel_values(value: np.ndarray | None, feature_axis: int, d: int) -> np.ndarray | None:
    """A constant broadcast against a tensor whose features are on `feature_axis` (negative) as `d`
    float64 values per feature, or None when it varies along another axis (or is not constant)."""
    if value is None:
        return None
    shape = np.shape(value)
    for axis in range(-1, -len(shape) - 1, -1):
        if shape[axis] != 1 and not (axis == feature_axis and shape[axis] == d):
            return None
    flat = np.asarray(value, dtype=np.float64).reshape(-1)
    return np.full(d, flat[0]) if flat.size == 1 else flat.copy()


def rank_ok(value: np.ndarray, tensor: gs.Tensor, axis: int = -1) -> bool:
    """A constant broadcast against `tensor` must not add dims to it."""
    rank = reshapes.rank_of(tensor)
    return np.ndim(value) <= (rank if rank is not None else max(-axis, 1))


def affine_step(node: gs.Node, tensor: gs.Tensor, axis: int, d: int, scope: Scope) -> Step | None:
    """`node` as a per-feature constant step applied to `tensor` (`d` features on `axis`), or None."""
    if node.op not in AFFINE_OPS or not is_default_domain(node.domain) or len(node.inputs) != 2:
        return None
    if node.inputs[0] is tensor:
        other = node.inputs[1]
    elif node.inputs[1] is tensor and node.op != "Div":
        other = node.inputs[0]
    else:
        return None
    constants = scope.constants
    if other is tensor or constants.is_graph_input(other):
        return None
    value = constants.value(other)
    if channel_values(value, axis, d) is None or not rank_ok(value, tensor, axis):
        return None
    if node.op == "Div" and not np.all(np.asarray(value) != 0):
        return None
    return Step((node,), StepKind.AFFINE, node.op, tensor, node.outputs[0], axis)


@dataclass(frozen=True)
class Candidate:
    """A node that reads `tensor` (its first input), which has `d` features on `axis`."""

    node: gs.Node
    tensor: gs.Tensor
    axis: int
    d: int
    scope: Scope

    def value(self, index: int) -> np.ndarray | None:
        """The constant value of input `index` (None when absent, empty or computed at run time)."""
        inputs = self.node.inputs
        if index >= len(inputs) or not inputs[index].name:
            return None
        return self.scope.constants.value(inputs[index])

    def extra_outputs_used(self) -> bool:
        return any(out.outputs or out.name in self.scope.outputs for out in self.node.outputs[1:])


def _identity(c: Candidate) -> StepKind | None:
    return StepKind.IDENTITY


def _dropout(c: Candidate) -> StepKind | None:
    training = len(c.node.inputs) > 2 and c.node.inputs[2].name
    if c.extra_outputs_used() or (training and not _is_false(c.value(2))):
        return None
    return StepKind.IDENTITY


def _reshape(c: Candidate) -> StepKind | None:
    keeps = c.axis == -1 and reshapes.keeps_last_axis(c.node, c.tensor, c.d, c.scope.constants)
    return StepKind.RESHAPE if keeps else None


def _prelu(c: Candidate) -> StepKind | None:
    return StepKind.SLOPE if c.value(1) is not None else StepKind.NONLINEAR


def _leaky_relu(c: Candidate) -> StepKind | None:
    return StepKind.SLOPE


def _batchnorm(c: Candidate) -> StepKind | None:
    if c.extra_outputs_used() or c.node.attrs.get("training_mode", 0):
        return None
    return StepKind.BATCHNORM if all(c.value(i) is not None for i in range(1, 5)) else None


def _nonlinear(c: Candidate) -> StepKind | None:
    return StepKind.NONLINEAR if len(c.node.outputs) == 1 else None


def _contrib_activation(c: Candidate) -> StepKind | None:
    """onnxruntime's GELUs; their inputs after the first (BiasGelu's and FastGelu's bias) are constant."""
    if len(c.node.outputs) != 1:
        return None
    rest = [i for i, t in enumerate(c.node.inputs) if i > 0 and t.name]
    return StepKind.NONLINEAR if all(c.value(i) is not None for i in rest) else None


# (domain, op) -> what the node is as a step, or None when it cannot be one.
CLASSIFIERS: dict[tuple[str, str], Callable[[Candidate], StepKind | None]] = {
    ("", "Identity"): _identity,
    ("", "Dropout"): _dropout,
    **{("", op): _reshape for op in reshapes.RESHAPE_OPS},
    ("", "PRelu"): _prelu,
    ("", "LeakyRelu"): _leaky_relu,
    ("", "BatchNormalization"): _batchnorm,
    **{("", op): _nonlinear for op in NONLINEAR_OPS},
    **{(MS_DOMAIN, op): _contrib_activation for op in activations.CONTRIB_ACTIVATIONS},
}


def classify(node: gs.Node, tensor: gs.Tensor, axis: int, d: int, scope: Scope) -> Step | None:
    """The step `node` makes of `tensor` (`d` features on `axis`), or None when it is none."""
    # Multi-node activations first: their first node may also be an activation op (Sigmoid of SiLU).
    pattern = activations.match(node, tensor, scope.outputs, scope.constants)
    if pattern is not None and len(pattern[0]) > 1:
        nodes, output, name = pattern
        return Step(tuple(nodes), StepKind.NONLINEAR, name, tensor, output, axis)
    if not node.inputs or not node.outputs:
        return None
    affine = affine_step(node, tensor, axis, d, scope)
    if affine is not None:
        return affine
    if node.inputs[0] is not tensor:
        return None
    domain = "" if is_default_domain(node.domain) else node.domain
    classifier = CLASSIFIERS.get((domain, node.op))
    kind = None if classifier is None else classifier(Candidate(node, tensor, axis, d, scope))
    return None if kind is None else Step((node,), kind, node.op, tensor, node.outputs[0], axis)


def _is_false(value: np.ndarray | None) -> bool:
    return value is not None and not bool(np.asarray(value).any())
