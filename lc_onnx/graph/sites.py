"""Finding collapse sites in a graph, read-only.

A *linear layer* is one of

- `Gemm` (`transA=0`, any `transB`/`alpha`/`beta`, optional `C`) on a rank-2 input;
- `MatMul` with a constant 2-D weight as its second input, optionally followed by an `Add` of a constant
  bias that broadcasts on the last axis, on an input of any rank >= 2;
- a 1x1 `Conv` (every kernel dim 1, `group` 1, strides and dilations 1, no padding) with an optional bias:
  the same linear map applied to every position, on the channel axis 1;

together with the per-feature constant steps right around it: `Mul`/`Add`/`Sub`/`Div` by a scalar or by
a vector broadcast on the layer's feature axis (LayerScale after a layer, a scaled input before it) are
part of the layer (`pre`, `post`), so they fold into a collapsed layer. Steps after a layer belong to it;
steps before one belong to it only when they do not follow another linear layer. Weights may be
initializers, `Constant` nodes or small constant subgraphs, read by `Constants`.

A *site* is a linear layer whose output reaches one or more linear layers of the same kind of feature
axis through a chain of *steps*: `Identity`, `Dropout`, `PRelu`, `LeakyRelu`, `BatchNormalization`,
per-feature constant `Mul`/`Add`/`Sub`/`Div`, `Reshape`/`Flatten`/`Squeeze`/`Unsqueeze` that keep the
feature (last) axis and only regroup the leading ones, or a known non-linear activation (one op, the
`com.microsoft` GELUs of onnxruntime's optimizer, or a multi-node pattern, see `activations`).
Matching records everything that stands in the way of a collapse as `problems` (a graph output or
another consumer in the middle, a weight that is a graph input, a non-float dtype); whether the
activation is linear enough is for `decide`. A constant shared with nodes outside the site is no
problem: the collapse writes tensors of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from lc_onnx.graph import activations
from lc_onnx.graph.algebra import Affine, ChannelAffine
from lc_onnx.graph.constants import Constants, describe
from lc_onnx.graph.reasons import Kind, Reason
from lc_onnx.model.protos import MS_DOMAIN, is_default_domain

log = logging.getLogger(__name__)

# Element-wise activations a site may have; linear only through calibration fits.
NONLINEAR_OPS = (
    "Relu", "Gelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus", "Softsign", "HardSigmoid",
    "HardSwish", "Mish", "Clip", "Erf", "ThresholdedRelu", "Swish",
)  # fmt: skip
AFFINE_OPS = ("Mul", "Add", "Sub", "Div")
RESHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
LINEAR_OPS = ("Gemm", "MatMul", "Conv")
FLOAT_TYPES = (np.float16, np.float32, np.float64)


@dataclass(frozen=True)
class Step:
    """One step between (or around) linear layers: a single node, or a multi-node pattern (`nodes[0]`
    reads `input`, the last one writes `output`).

    `kind` is identity (Identity, Dropout), reshape (leading axes only), affine (per-feature constant),
    slope (PRelu/LeakyRelu), batchnorm or nonlinear. `feature_axis` is the feature axis as a negative
    index (-1 for Gemm/MatMul layers, `1 - rank` for convolutions).
    """

    nodes: tuple[gs.Node, ...]
    kind: str
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
        if self.kind in ("identity", "reshape"):
            return ChannelAffine.identity(d)
        if self.kind != "affine":
            raise ValueError(f"{self.kind} step {self.key} has no exact affine form")
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


@dataclass(frozen=True)
class Linear:
    """One linear layer `y = post(pre(x) @ W + b)`, whatever its ONNX spelling.

    `core` is the Gemm, MatMul or Conv node; `nodes` are all nodes from the first `pre` step to the last
    `post` step; `weight`/`bias` are the core's graph tensors as it consumes them (a Gemm with `transB=1`
    holds `W.T`, a Conv `[d_out, d_in, 1, ...]`).
    """

    core: gs.Node
    nodes: tuple[gs.Node, ...]
    input: gs.Tensor
    output: gs.Tensor
    weight: gs.Tensor
    bias: gs.Tensor | None
    trans_b: bool = False
    alpha: float = 1.0
    beta: float = 1.0
    pre: tuple[Step, ...] = ()
    post: tuple[Step, ...] = ()
    feature_axis: int = -1  # as a negative index of the input (conv: the channel axis 1)
    problems: tuple[Reason, ...] = ()

    @property
    def kind(self) -> str:
        return {"Gemm": "gemm", "MatMul": "matmul", "Conv": "conv"}[self.core.op]

    @property
    def is_gemm(self) -> bool:
        return self.core.op == "Gemm"

    @property
    def is_conv(self) -> bool:
        return self.core.op == "Conv"

    @property
    def core_input(self) -> gs.Tensor:
        return self.core.inputs[0]

    @property
    def name(self) -> str:
        return describe(self.core)

    def weight_matrix(self, constants: Constants) -> np.ndarray:
        """`W` as `[d_in, d_out]` in the weight's own dtype (alpha applied in float64 by the caller)."""
        w = constants.value(self.weight)
        if self.is_conv:
            return w.reshape(w.shape[0], w.shape[1]).T
        return w.T if self.trans_b else w

    def shape(self, constants: Constants) -> tuple[int, int]:
        w = constants.value(self.weight)
        if self.is_conv or self.trans_b:
            return int(w.shape[1]), int(w.shape[0])
        return int(w.shape[0]), int(w.shape[1])

    def affine(self, constants: Constants) -> Affine:
        """The whole layer, `pre` and `post` steps included, as one float64 `Affine`."""
        from lc_onnx.graph import algebra

        d_in, d_out = self.shape(constants)
        w = np.asarray(self.weight_matrix(constants), dtype=np.float64) * self.alpha
        b = None
        if self.bias is not None:
            b = np.asarray(constants.value(self.bias), dtype=np.float64) * self.beta
            b = b.reshape(-1) if b.size == d_out else np.full(d_out, b.reshape(-1)[0])
        pre = [s.channel_affine(constants, d_in) for s in self.pre]
        post = [s.channel_affine(constants, d_out) for s in self.post]
        return algebra.with_steps(algebra.linear(w, b), pre, post)


@dataclass(frozen=True)
class Site:
    """A linear layer whose output reaches `consumers` (linear layers) through `steps`."""

    producer: Linear
    steps: tuple[Step, ...]
    consumers: tuple[Linear, ...]
    problems: tuple[Reason, ...] = field(default=())
    # `Shape` nodes reading a tensor inside the site, and the tensor that holds that same shape outside
    # it (the target of the reshape the tensor came from): the rewrite makes them read it instead.
    shape_users: tuple[tuple[gs.Node, gs.Tensor], ...] = ()

    @property
    def hidden(self) -> gs.Tensor:
        return self.steps[-1].output if self.steps else self.producer.output

    @property
    def activation(self) -> str:
        return ",".join(step.op for step in self.steps if step.kind != "reshape") or "none"

    @property
    def nodes(self) -> list[gs.Node]:
        """Every node of the site, in order (the layers' own steps included)."""
        nodes = list(self.producer.nodes) + [n for step in self.steps for n in step.nodes]
        return nodes + [n for consumer in self.consumers for n in consumer.nodes]

    def node_names(self) -> list[str]:
        return [describe(n) for n in self.nodes]


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


def _size(tensor: gs.Tensor, constants: Constants) -> int:
    """Element count of a float constant; 0 for anything computed at run time (a reshape target)."""
    value = constants.value(tensor)
    return int(value.size) if value is not None and _is_float(value.dtype) else 0


def exclusive_params(nodes: list[gs.Node], constants: Constants) -> int:
    """Floating-point weights that only `nodes` read: what disappears when they are replaced.

    A constant also read by a node outside `nodes` (exporters deduplicate equal tensors, such as the
    zero biases of a fresh model) stays in the graph and is not counted.
    """
    members = {id(n) for n in nodes}
    produced = {out.name for n in nodes for out in n.outputs}
    seen: set[str] = set()
    total = 0
    for node in nodes:
        for tensor in node.inputs:
            if not tensor.name or tensor.name in seen or tensor.name in produced:
                continue
            seen.add(tensor.name)
            if constants.is_graph_input(tensor):
                continue
            if all(id(c) in members for c in tensor.outputs):
                total += _size(tensor, constants)
    return total


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

    @property
    def graph_outputs(self) -> set[str]:
        return self._outputs

    def sites(self) -> Iterator[Site]:
        for node in list(self.graph.nodes):
            if node.op in LINEAR_OPS and is_default_domain(node.domain):
                layer = self.linear(node, leading=True)
                if layer is not None:
                    site = self._follow(layer)
                    if site is not None:
                        yield site

    def linear(self, node: gs.Node, *, leading: bool = False) -> Linear | None:
        """The linear layer whose core is `node`, or None when `node` is not one. With `leading`, the
        per-feature steps before it join the layer unless they follow another linear layer."""
        core = self._core(node)
        if core is None:
            return None
        x, w, bias, extra_nodes, attrs, problems = core
        axis = -1 if node.op != "Conv" else 1 - len(w.shape)
        d_in, d_out = self._dims(node, w)
        nodes = [node, *extra_nodes]
        out = nodes[-1].outputs[0]
        post = self._affine_run(out, axis, d_out)
        pre = self._leading(x, axis, d_in) if leading else []
        return Linear(
            node,
            tuple(n for s in pre for n in s.nodes) + tuple(nodes) + tuple(n for s in post for n in s.nodes),
            pre[0].input if pre else x,
            post[-1].output if post else out,
            w,
            bias,
            pre=tuple(pre),
            post=tuple(post),
            feature_axis=axis,
            problems=tuple(problems),
            **attrs,
        )

    def _dims(self, node: gs.Node, w: gs.Tensor) -> tuple[int, int]:
        value = self.constants.value(w)
        shape = value.shape if value is not None else tuple(w.shape)
        if node.op == "Conv" or (node.op == "Gemm" and node.attrs.get("transB", 0)):
            return int(shape[1]), int(shape[0])
        return int(shape[0]), int(shape[1])

    def _core(self, node: gs.Node):
        """(input, weight, bias, extra nodes, Linear attrs, problems) of a linear core, or None."""
        if node.op == "Gemm":
            return self._gemm(node)
        if node.op == "MatMul":
            return self._matmul(node)
        if node.op == "Conv":
            return self._conv(node)
        return None

    def _weight_problems(self, node: gs.Node, tensor: gs.Tensor, role: str) -> list[Reason]:
        if self.constants.is_graph_input(tensor):
            return [Reason(Kind.GRAPH_INPUT, f"{role} {tensor.name!r} of {describe(node)} is a graph input")]
        return []

    def _is_weight(self, tensor: gs.Tensor) -> bool:
        if self.constants.is_graph_input(tensor):
            return tensor.shape is not None and all(isinstance(d, int) for d in tensor.shape)
        return self.constants.value(tensor) is not None

    def _weight_checks(self, node: gs.Node, w: gs.Tensor, rank: int) -> list[Reason] | None:
        """Problems of a weight, or None when it cannot be a weight of `rank` dims at all."""
        problems = self._weight_problems(node, w, "weight")
        value = self.constants.value(w)
        shape = value.shape if value is not None else tuple(w.shape or ())
        if len(shape) != rank:
            return None
        if value is not None:
            problems += self._dtype_problems(node, value)
        return problems

    def _gemm(self, node: gs.Node):
        if node.attrs.get("transA", 0) or len(node.inputs) < 2:
            return None
        x, w = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if not self._is_weight(w) or (c is not None and not self._is_weight(c)):
            return None
        problems = self._weight_checks(node, w, 2)
        if problems is None:
            return None
        trans_b = bool(node.attrs.get("transB", 0))
        if c is not None:
            problems += self._weight_problems(node, c, "bias")
            d_out = self._dims(node, w)[1]
            value = self.constants.value(c)
            if value is not None and not _broadcasts_to_row(value.shape, d_out):
                problems.append(
                    Reason(Kind.SHAPE, f"bias of {describe(node)} has shape {value.shape}, not a row")
                )
        attrs = {
            "trans_b": trans_b,
            "alpha": float(node.attrs.get("alpha", 1.0)),
            "beta": float(node.attrs.get("beta", 1.0)),
        }
        return x, w, c, [], attrs, problems

    def _matmul(self, node: gs.Node):
        x, w = node.inputs[0], node.inputs[1]
        if not self._is_weight(w) or self.constants.value(x) is not None:
            return None
        if x.shape is not None and len(x.shape) < 2:
            return None
        problems = self._weight_checks(node, w, 2)
        if problems is None:
            return None
        d_out = self._dims(node, w)[1]
        out = node.outputs[0]
        consumers = out.outputs
        if out.name not in self._outputs and len(consumers) == 1 and consumers[0].op == "Add":
            add = consumers[0]
            other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            bias_value = self.constants.value(other)
            if (
                bias_value is not None
                and _broadcasts_to_row(bias_value.shape, d_out)
                and _rank_ok(bias_value, out)
            ):
                return x, w, other, [add], {}, problems
        return x, w, None, [], {}, problems

    def _conv(self, node: gs.Node):
        x, w = node.inputs[0], node.inputs[1]
        if not self._is_weight(w) or self.constants.value(x) is not None:
            return None
        value = self.constants.value(w)
        shape = value.shape if value is not None else tuple(w.shape or ())
        if len(shape) < 3 or any(k != 1 for k in shape[2:]):
            return None
        rank = len(shape) - 2
        attrs = node.attrs
        if (
            int(attrs.get("group", 1)) != 1
            or any(int(s) != 1 for s in attrs.get("strides", [1] * rank))
            or any(int(d) != 1 for d in attrs.get("dilations", [1] * rank))
            or any(int(p) != 0 for p in attrs.get("pads", [0] * 2 * rank))
            or _text(attrs.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID")
        ):
            return None
        problems = self._weight_checks(node, w, len(shape))
        if problems is None:
            return None
        b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if b is not None:
            if not self._is_weight(b):
                return None
            problems += self._weight_problems(node, b, "bias")
        return x, w, b, [], {}, problems

    def _dtype_problems(self, node: gs.Node, value: np.ndarray) -> list[Reason]:
        if _is_float(value.dtype):
            return []
        return [Reason(Kind.DTYPE, f"{describe(node)} has dtype {value.dtype}, not floating point")]

    def _affine_step(self, node: gs.Node, tensor: gs.Tensor, axis: int, d: int) -> Step | None:
        """`node` as a per-feature constant step applied to `tensor`, or None."""
        if node.op not in AFFINE_OPS or not is_default_domain(node.domain) or len(node.inputs) != 2:
            return None
        if node.inputs[0] is tensor:
            other = node.inputs[1]
        elif node.inputs[1] is tensor and node.op != "Div":
            other = node.inputs[0]
        else:
            return None
        if other is tensor or self.constants.is_graph_input(other):
            return None
        value = self.constants.value(other)
        if channel_values(value, axis, d) is None or not _rank_ok(value, tensor, axis):
            return None
        if node.op == "Div" and not np.all(np.asarray(value) != 0):
            return None
        return Step((node,), "affine", node.op, tensor, node.outputs[0], axis)

    def _single_user(self, tensor: gs.Tensor) -> gs.Node | None:
        if tensor.name in self._outputs or len(tensor.outputs) != 1:
            return None
        return tensor.outputs[0]

    def _affine_run(self, tensor: gs.Tensor, axis: int, d: int) -> list[Step]:
        """The per-feature constant steps that follow `tensor` one after the other."""
        steps: list[Step] = []
        while (user := self._single_user(tensor)) is not None:
            step = self._affine_step(user, tensor, axis, d)
            if step is None:
                break
            steps.append(step)
            tensor = step.output
        return steps

    def _leading(self, x: gs.Tensor, axis: int, d: int) -> list[Step]:
        """The per-feature constant steps right before a layer whose input is `x`, unless they follow
        another linear layer (then they are that layer's own `post` steps)."""
        steps: list[Step] = []
        tensor = x
        while tensor.inputs and self._single_user(tensor) is not None:
            node = tensor.inputs[0]
            data = [t for t in node.inputs if t.name and self.constants.value(t) is None]
            if len(data) != 1:
                break
            step = self._affine_step(node, data[0], axis, d)
            if step is None:
                break
            steps.insert(0, step)
            tensor = data[0]
        if steps and tensor.inputs and tensor.inputs[0].op in LINEAR_OPS:
            return []  # the previous layer's `post` steps (its bias Add included)
        return steps

    def _follow(self, layer: Linear) -> Site | None:
        steps: list[Step] = []
        problems = list(layer.problems)
        tensor = layer.output
        axis = layer.feature_axis
        d_h = self._dims(layer.core, layer.weight)[1]
        shape_users: list[tuple[gs.Node, gs.Tensor]] = []
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
                if c.op in LINEAR_OPS and c.inputs and c.inputs[0] is tensor
                for lin in [self.linear(c)]
                if lin is not None and lin.is_conv == layer.is_conv
            ]
            if linears:
                others = [c for c in consumers if all(c is not lin.core for lin in linears)]
                problems += self._other_consumers(tensor, others, steps, shape_users)
                for lin in linears:
                    problems += lin.problems
                return Site(
                    layer, tuple(steps), tuple(linears), tuple(dict.fromkeys(problems)), tuple(shape_users)
                )
            # A multi-node pattern can be found from several of its nodes: one step per output.
            found = {
                id(st.output): st for c in consumers if (st := self._step(c, tensor, axis, d_h)) is not None
            }
            if len(found) != 1:
                return None
            step = next(iter(found.values()))
            others = [c for c in consumers if all(c is not n for n in step.nodes)]
            problems += self._other_consumers(tensor, others, steps, shape_users)
            steps.append(step)
            tensor = step.output
        return None

    def _other_consumers(
        self, tensor: gs.Tensor, others: list[gs.Node], steps: list[Step], shape_users: list
    ) -> list[Reason]:
        """The problem of nodes outside the site reading `tensor`, inside it; none when they are `Shape`
        nodes and the shape is held by a tensor outside the site (then recorded in `shape_users`)."""
        if not others:
            return []
        source = self._shape_source(steps)
        if source is not None and all(c.op == "Shape" and is_default_domain(c.domain) for c in others):
            shape_users += [(c, source) for c in others]
            return []
        return [Reason(Kind.CONSUMER, f"{tensor.name!r} also feeds {describe(others[0])}")]

    def _shape_source(self, steps: list[Step]) -> gs.Tensor | None:
        """The shape of the tensors after the last reshape in `steps`, as a tensor of the graph: that
        `Reshape`'s target when every entry is a real dim (a positive constant, or read from a `Shape`),
        never `-1` or `0`, so that it equals the shape it produces."""
        reshapes = [s for s in steps if s.kind == "reshape"]
        if not reshapes or reshapes[-1].op != "Reshape":
            return None
        target = reshapes[-1].node.inputs[1]
        value = self.constants.value(target)
        if value is not None:
            return target if np.all(np.asarray(value) > 0) else None
        node = target.inputs[0] if target.inputs else None
        if node is None or node.op != "Concat":
            return None
        return target if all(self._real_dims(t) for t in node.inputs) else None

    def _real_dims(self, tensor: gs.Tensor) -> bool:
        value = self.constants.value(tensor)
        if value is not None:
            return bool(np.all(np.asarray(value) > 0))
        node = tensor.inputs[0] if tensor.inputs else None
        while node is not None and node.op in ("Unsqueeze", "Squeeze", "Gather", "Slice", "Identity", "Cast"):
            source = node.inputs[0]
            node = source.inputs[0] if source.inputs else None
        return node is not None and node.op == "Shape"

    def _step(self, node: gs.Node, tensor: gs.Tensor, axis: int, d: int) -> Step | None:
        # Multi-node activations first: their first node may also be an activation op (Sigmoid of SiLU).
        pattern = activations.match(node, tensor, self._outputs, self.constants)
        if pattern is not None and len(pattern[0]) > 1:
            nodes, output, name = pattern
            return Step(tuple(nodes), "nonlinear", name, tensor, output, axis)
        if not node.inputs or not node.outputs:
            return None
        affine = self._affine_step(node, tensor, axis, d)
        if affine is not None:
            return affine
        if node.inputs[0] is not tensor:
            return None
        extra_outputs_used = any(out.outputs or out.name in self._outputs for out in node.outputs[1:])
        op = node.op
        if node.domain == MS_DOMAIN:
            if op in activations.CONTRIB_ACTIVATIONS and len(node.outputs) == 1:
                constant_rest = all(self.constants.value(t) is not None for t in node.inputs[1:] if t.name)
                return (
                    Step((node,), "nonlinear", op, tensor, node.outputs[0], axis) if constant_rest else None
                )
            return None
        if not is_default_domain(node.domain):
            return None

        def single(kind: str) -> Step:
            return Step((node,), kind, op, tensor, node.outputs[0], axis)

        if op == "Identity":
            return single("identity")
        if op == "Dropout":
            training = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            if extra_outputs_used or (training is not None and not _is_false(self.constants.value(training))):
                return None
            return single("identity")
        if op in RESHAPE_OPS:
            return single("reshape") if axis == -1 and self._keeps_last_axis(node, tensor, d) else None
        if op == "PRelu":
            return single("slope" if self.constants.value(node.inputs[1]) is not None else "nonlinear")
        if op == "LeakyRelu":
            return single("slope")
        if op == "BatchNormalization":
            if extra_outputs_used or node.attrs.get("training_mode", 0):
                return None
            if any(self.constants.value(t) is None for t in node.inputs[1:5]):
                return None
            return single("batchnorm")
        if op in NONLINEAR_OPS and len(node.outputs) == 1:
            return single("nonlinear")
        return None

    def _keeps_last_axis(self, node: gs.Node, tensor: gs.Tensor, d: int) -> bool:
        """True when a Reshape/Flatten/Squeeze/Unsqueeze only merges or splits the leading axes of a
        tensor whose last axis has `d` features (so rows of `d` values stay rows, in order)."""
        rank = rank_of(tensor)
        out = node.outputs[0]
        if node.op == "Reshape":
            if len(node.inputs) < 2:
                return False
            last, length = self._last_shape_entry(node.inputs[1], tensor, d)
            if last == d:
                return True
            if last == 0 and not node.attrs.get("allowzero", 0):
                return rank is not None and length == rank  # copies the input's last dim
            return last == -1 and out.shape is not None and len(out.shape) > 0 and out.shape[-1] == d
        if node.op == "Flatten":
            axis = int(node.attrs.get("axis", 1))
            return rank is not None and axis in (rank - 1, -1)
        axes = self._axes(node)
        if axes is None:
            return False
        if node.op == "Squeeze":
            return rank is not None and all(a not in (-1, rank - 1) for a in axes)
        out_rank = None if rank is None else rank + len(axes)
        return out_rank is not None and all(a not in (-1, out_rank - 1) for a in axes)

    def _axes(self, node: gs.Node) -> list[int] | None:
        if "axes" in node.attrs:
            return [int(a) for a in node.attrs["axes"]]
        if len(node.inputs) > 1 and node.inputs[1].name:
            value = self.constants.value(node.inputs[1])
            return None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]
        return None if node.op == "Unsqueeze" else []  # Squeeze without axes: every 1-dim (unknowable)

    def _last_shape_entry(self, shape: gs.Tensor, tensor: gs.Tensor, d: int) -> tuple[int | None, int | None]:
        """The last entry of a Reshape's target shape and the shape's length (None when unknown), for a
        Reshape of `tensor` (`d` features): from its value, or from the last input of the `Concat` that
        builds it at run time (exporters append the feature count, or read it off `tensor`)."""
        value = self.constants.value(shape)
        length = None if value is None else int(np.size(value))
        if value is None and shape.inputs and shape.inputs[0].op == "Concat" and shape.inputs[0].inputs:
            value = self._shape_tail(shape.inputs[0].inputs[-1], tensor, d)
        if value is None or np.size(value) == 0:
            return None, length
        return int(np.asarray(value).reshape(-1)[-1]), length

    def _shape_tail(self, value_of: gs.Tensor, tensor: gs.Tensor, d: int) -> np.ndarray | None:
        """A constant, or the last entry of a shape read at run time (`Slice(Shape(t), -1:)`,
        `Shape(t, start=-1)`, through `Squeeze`/`Unsqueeze`) when that dim is static or `t` is `tensor`
        (whose last dim is `d`)."""
        value = self.constants.value(value_of)
        if value is not None or not value_of.inputs:
            return value
        node = value_of.inputs[0]
        if node.op in ("Squeeze", "Unsqueeze", "Identity"):
            return self._shape_tail(node.inputs[0], tensor, d)
        if node.op == "Slice" and len(node.inputs) >= 3 and node.inputs[0].inputs:
            starts = self.constants.value(node.inputs[1])
            if starts is None or np.asarray(starts).reshape(-1).tolist() != [-1]:
                return None
            node, start = node.inputs[0].inputs[0], -1
        elif node.op == "Shape":
            start = int(node.attrs.get("start", 0))
        else:
            return None
        if node.op != "Shape" or start != -1 or "end" in node.attrs:
            return None
        if node.inputs[0] is tensor:
            return np.asarray([d])
        dims = node.inputs[0].shape
        return np.asarray([dims[-1]]) if dims and isinstance(dims[-1], int) else None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _rank_ok(value: np.ndarray, tensor: gs.Tensor, axis: int = -1) -> bool:
    """A constant broadcast against `tensor` must not add dims to it."""
    k = np.ndim(value)
    rank = rank_of(tensor)
    return k <= (rank if rank is not None else max(-axis, 1))


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
