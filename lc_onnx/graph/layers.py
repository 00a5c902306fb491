"""Linear layers in a graph, read-only: one matcher per ONNX spelling, each returning a typed match.

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

A new spelling is one matcher in `MATCHERS` (plus its algebra in `Linear.affine` where its weight layout
differs, and its emission in `rewrite.EMITTERS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from lc_onnx.graph import algebra
from lc_onnx.graph.algebra import Affine
from lc_onnx.graph.constant_eval import Constants, describe
from lc_onnx.graph.reasons import Kind, Reason
from lc_onnx.graph.steps import Scope, Step, affine_step, rank_ok

FLOAT_TYPES = (np.float16, np.float32, np.float64)


@dataclass(frozen=True)
class LayerMatch:
    """What a matcher reads off a linear core: its data input, weight and bias as the core consumes
    them, the nodes after the core that belong to it (a MatMul's bias `Add`), and what stands in the way
    of a collapse."""

    input: gs.Tensor
    weight: gs.Tensor
    bias: gs.Tensor | None
    extra_nodes: tuple[gs.Node, ...] = ()
    trans_b: bool = False
    alpha: float = 1.0
    beta: float = 1.0
    problems: tuple[Reason, ...] = ()


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
        d_in, d_out = self.shape(constants)
        w = np.asarray(self.weight_matrix(constants), dtype=np.float64) * self.alpha
        b = None
        if self.bias is not None:
            b = np.asarray(constants.value(self.bias), dtype=np.float64) * self.beta
            b = b.reshape(-1) if b.size == d_out else np.full(d_out, b.reshape(-1)[0])
        pre = [s.channel_affine(constants, d_in) for s in self.pre]
        post = [s.channel_affine(constants, d_out) for s in self.post]
        return algebra.with_steps(algebra.linear(w, b), pre, post)


def layer_dims(node: gs.Node, weight: gs.Tensor, constants: Constants) -> tuple[int, int]:
    """`(d_in, d_out)` of the linear core `node` with `weight`."""
    value = constants.value(weight)
    shape = value.shape if value is not None else tuple(weight.shape)
    if node.op == "Conv" or (node.op == "Gemm" and node.attrs.get("transB", 0)):
        return int(shape[1]), int(shape[0])
    return int(shape[0]), int(shape[1])


def _is_weight(tensor: gs.Tensor, constants: Constants) -> bool:
    if constants.is_graph_input(tensor):
        return tensor.shape is not None and all(isinstance(d, int) for d in tensor.shape)
    return constants.value(tensor) is not None


def _input_problems(node: gs.Node, tensor: gs.Tensor, role: str, constants: Constants) -> list[Reason]:
    if constants.is_graph_input(tensor):
        return [Reason(Kind.GRAPH_INPUT, f"{role} {tensor.name!r} of {describe(node)} is a graph input")]
    return []


def _weight_checks(node: gs.Node, w: gs.Tensor, rank: int, constants: Constants) -> list[Reason] | None:
    """Problems of a weight, or None when it cannot be a weight of `rank` dims at all."""
    problems = _input_problems(node, w, "weight", constants)
    value = constants.value(w)
    shape = value.shape if value is not None else tuple(w.shape or ())
    if len(shape) != rank:
        return None
    if value is not None and not is_float(value.dtype):
        problems.append(Reason(Kind.DTYPE, f"{describe(node)} has dtype {value.dtype}, not floating point"))
    return problems


def _optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


def match_gemm(node: gs.Node, scope: Scope) -> LayerMatch | None:
    constants = scope.constants
    if node.attrs.get("transA", 0) or len(node.inputs) < 2:
        return None
    x, w, c = node.inputs[0], node.inputs[1], _optional_input(node, 2)
    if not _is_weight(w, constants) or (c is not None and not _is_weight(c, constants)):
        return None
    problems = _weight_checks(node, w, 2, constants)
    if problems is None:
        return None
    if c is not None:
        problems += _input_problems(node, c, "bias", constants)
        d_out = layer_dims(node, w, constants)[1]
        value = constants.value(c)
        if value is not None and not broadcasts_to_row(value.shape, d_out):
            problems.append(
                Reason(Kind.SHAPE, f"bias of {describe(node)} has shape {value.shape}, not a row")
            )
    return LayerMatch(
        x,
        w,
        c,
        trans_b=bool(node.attrs.get("transB", 0)),
        alpha=float(node.attrs.get("alpha", 1.0)),
        beta=float(node.attrs.get("beta", 1.0)),
        problems=tuple(problems),
    )


def match_matmul(node: gs.Node, scope: Scope) -> LayerMatch | None:
    constants = scope.constants
    x, w = node.inputs[0], node.inputs[1]
    if not _is_weight(w, constants) or constants.value(x) is not None:
        return None
    if x.shape is not None and len(x.shape) < 2:
        return None
    problems = _weight_checks(node, w, 2, constants)
    if problems is None:
        return None
    d_out = layer_dims(node, w, constants)[1]
    out = node.outputs[0]
    add = scope.single_user(out)
    if add is not None and add.op == "Add":
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        bias = constants.value(other)
        if bias is not None and broadcasts_to_row(bias.shape, d_out) and rank_ok(bias, out):
            return LayerMatch(x, w, other, extra_nodes=(add,), problems=tuple(problems))
    return LayerMatch(x, w, None, problems=tuple(problems))


def match_conv(node: gs.Node, scope: Scope) -> LayerMatch | None:
    constants = scope.constants
    x, w = node.inputs[0], node.inputs[1]
    if not _is_weight(w, constants) or constants.value(x) is not None:
        return None
    value = constants.value(w)
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
    problems = _weight_checks(node, w, len(shape), constants)
    if problems is None:
        return None
    b = _optional_input(node, 2)
    if b is not None:
        if not _is_weight(b, constants):
            return None
        problems += _input_problems(node, b, "bias", constants)
    return LayerMatch(x, w, b, problems=tuple(problems))


# Core op -> its matcher. The keys are the ops that can start a linear layer.
MATCHERS: dict[str, Callable[[gs.Node, Scope], LayerMatch | None]] = {
    "Gemm": match_gemm,
    "MatMul": match_matmul,
    "Conv": match_conv,
}
LINEAR_OPS = tuple(MATCHERS)


def match_linear(node: gs.Node, scope: Scope, *, leading: bool = False) -> Linear | None:
    """The linear layer whose core is `node`, or None when `node` is not one. With `leading`, the
    per-feature steps before it join the layer unless they follow another linear layer."""
    matcher = MATCHERS.get(node.op)
    found = None if matcher is None else matcher(node, scope)
    if found is None:
        return None
    axis = -1 if node.op != "Conv" else 1 - len(found.weight.shape)
    d_in, d_out = layer_dims(node, found.weight, scope.constants)
    core_nodes = (node, *found.extra_nodes)
    out = core_nodes[-1].outputs[0]
    post = affine_run(out, axis, d_out, scope)
    pre = leading_steps(found.input, axis, d_in, scope) if leading else []
    return Linear(
        node,
        tuple(n for s in pre for n in s.nodes) + core_nodes + tuple(n for s in post for n in s.nodes),
        pre[0].input if pre else found.input,
        post[-1].output if post else out,
        found.weight,
        found.bias,
        trans_b=found.trans_b,
        alpha=found.alpha,
        beta=found.beta,
        pre=tuple(pre),
        post=tuple(post),
        feature_axis=axis,
        problems=found.problems,
    )


def affine_run(tensor: gs.Tensor, axis: int, d: int, scope: Scope) -> list[Step]:
    """The per-feature constant steps that follow `tensor` one after the other."""
    steps: list[Step] = []
    while (user := scope.single_user(tensor)) is not None:
        step = affine_step(user, tensor, axis, d, scope)
        if step is None:
            break
        steps.append(step)
        tensor = step.output
    return steps


def leading_steps(x: gs.Tensor, axis: int, d: int, scope: Scope) -> list[Step]:
    """The per-feature constant steps right before a layer whose input is `x`, unless they follow
    another linear layer (then they are that layer's own `post` steps)."""
    steps: list[Step] = []
    tensor = x
    while tensor.inputs and scope.single_user(tensor) is not None:
        node = tensor.inputs[0]
        data = [t for t in node.inputs if t.name and scope.constants.value(t) is None]
        if len(data) != 1:
            break
        step = affine_step(node, data[0], axis, d, scope)
        if step is None:
            break
        steps.insert(0, step)
        tensor = data[0]
    if steps and tensor.inputs and tensor.inputs[0].op in LINEAR_OPS:
        return []  # the previous layer's `post` steps (its bias Add included)
    return steps


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
                total += _float_size(tensor, constants)
    return total


def _float_size(tensor: gs.Tensor, constants: Constants) -> int:
    """Element count of a float constant; 0 for anything computed at run time (a reshape target)."""
    value = constants.value(tensor)
    return int(value.size) if value is not None and is_float(value.dtype) else 0


def is_float(dtype) -> bool:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return False
    return dt in [np.dtype(t) for t in FLOAT_TYPES] or dt.name == "bfloat16"


def broadcasts_to_row(shape: tuple[int, ...], d: int) -> bool:
    """True when a tensor of `shape` broadcast against `[..., d]` adds one value per column."""
    dims = list(shape)
    if dims and dims[-1] not in (1, d):
        return False
    return all(x == 1 for x in dims[:-1])


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
