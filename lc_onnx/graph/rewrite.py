"""Applying collapse decisions to a graphsurgeon graph.

Each head's output tensor keeps its name and consumers; the new layer is written the way the torch
exporters write `nn.Linear`: `Gemm(x, W.T, b, transB=1)` on rank-2 inputs, `MatMul(x, W)` then `Add(., b)`
on higher (or unknown) ranks, and no bias when the composed bias is zero; collapsed 1x1 convolutions stay
one 1x1 `Conv`. When reshapes between the layers regrouped the leading axes, a `Reshape` to the head's
leading shape follows the new layer. Old nodes are only cut
from their outputs; one `cleanup().toposort()` at the end of a round removes whatever became dead.
Weights are composed in float64 (by `decide`) and cast back to the original weight dtype here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lc_onnx.graph.constant_eval import Constants
from lc_onnx.graph.decide import CollapsePlan
from lc_onnx.graph.layers import Linear
from lc_onnx.graph.reshapes import rank_of


class Namer:
    """Unique node and tensor names derived from existing ones."""

    def __init__(self, graph: gs.Graph) -> None:
        self._used = {n.name for n in graph.nodes} | set(graph.tensors().keys())

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self._used:
            k += 1
            name = f"{base}_{k}"
        self._used.add(name)
        return name


@dataclass(frozen=True)
class Emission:
    """One collapsed layer to write: `output = input @ weight + bias` in the spelling of `kind`.

    `weight` is `[d_in, d_out]` and `bias` `[d_out]` (None: no bias), both in the model's dtype; `name`
    is the base of every node and tensor name the layer gets; `spatial` is a 1x1 conv's spatial rank.
    """

    kind: str  # "gemm", "matmul" or "conv"
    name: str
    input: gs.Tensor
    output: gs.Tensor
    weight: np.ndarray
    bias: np.ndarray | None
    spatial: int = 0


class Writer:
    """Adds nodes and constants to a graph under unique names; one method per emitted spelling."""

    def __init__(self, graph: gs.Graph, constants: Constants) -> None:
        self.graph = graph
        self.constants = constants
        self.name = Namer(graph)

    def node(self, op: str, name: str, inputs: list, outputs: list, attrs: dict | None = None) -> None:
        self.graph.nodes.append(
            gs.Node(op, self.name(name), attrs=attrs or {}, inputs=inputs, outputs=outputs)
        )

    def constant(self, name: str, value: np.ndarray) -> gs.Constant:
        return self.constants.add(self.name(name), value)

    def emit(self, e: Emission) -> None:
        EMITTERS[e.kind](self, e)

    def gemm(self, e: Emission) -> None:
        inputs = [e.input, self.constant(e.name + ".weight", np.ascontiguousarray(e.weight.T))]
        if e.bias is not None:
            inputs.append(self.constant(e.name + ".bias", e.bias))
        self.node("Gemm", e.name, inputs, [e.output], {"transB": 1})

    def conv(self, e: Emission) -> None:
        """A 1x1 convolution over `e.spatial` dims: the weight `[d_out, d_in, 1, ...]`."""
        d_in, d_out = e.weight.shape
        kernel = np.ascontiguousarray(e.weight.T).reshape(d_out, d_in, *([1] * e.spatial))
        inputs = [e.input, self.constant(e.name + ".weight", kernel)]
        if e.bias is not None:
            inputs.append(self.constant(e.name + ".bias", e.bias))
        self.node("Conv", e.name, inputs, [e.output], {"kernel_shape": [1] * e.spatial})

    def matmul(self, e: Emission) -> None:
        w = self.constant(e.name + ".weight", np.ascontiguousarray(e.weight))
        if e.bias is None:
            self.node("MatMul", e.name, [e.input, w], [e.output])
            return
        out = e.output
        mm = gs.Variable(self.name(e.name + "/MatMul_output_0"), dtype=out.dtype, shape=out.shape)
        self.node("MatMul", e.name + "/MatMul", [e.input, w], [mm])
        self.node("Add", e.name + "/Add", [mm, self.constant(e.name + ".bias", e.bias)], [out])


# Emission kind -> how it is written. A new linear-layer spelling adds its emitter here.
EMITTERS: dict[str, Callable[[Writer, Emission], None]] = {
    "gemm": Writer.gemm,
    "matmul": Writer.matmul,
    "conv": Writer.conv,
}


def apply(graph: gs.Graph, collapses: Sequence[CollapsePlan], constants: Constants) -> None:
    """Rewrite `graph` in place: one new linear layer per head of every collapse."""
    writer = Writer(graph, constants)
    for collapse in collapses:
        first = collapse.chain[0]
        dtype = np.asarray(constants.value(first.weight)).dtype
        kind = _emission_kind(first)
        for head in collapse.heads:
            base = (head.layer.core.name or first.core.name or "lc") + "/collapsed"
            out = head.layer.output
            head.layer.nodes[-1].outputs.clear()
            target = out
            if head.reshape is not None:
                target = gs.Variable(writer.name(base + "/output"), dtype=out.dtype)
            writer.emit(
                Emission(
                    kind,
                    base,
                    first.input,
                    target,
                    head.result.weight.astype(dtype),
                    head.result.bias.astype(dtype) if head.with_bias else None,
                    spatial=-first.feature_axis - 1,
                )
            )
            if head.reshape is not None:
                shape = writer.constant(base + "/shape", np.asarray(head.reshape, dtype=np.int64))
                writer.node("Reshape", base + "/Reshape", [target, shape], [out])
        for site in collapse.sites:
            for node, source in site.shape_users:
                _read_shape_from(node, source, writer)
    graph.cleanup().toposort()


def _emission_kind(first: Linear) -> str:
    """How the collapsed layer is spelled: a conv stays a 1x1 conv, rank-2 inputs get a Gemm (as the
    torch exporters write `nn.Linear`), higher or unknown ranks MatMul + Add."""
    if first.is_conv:
        return "conv"
    return "gemm" if first.is_gemm or rank_of(first.input) == 2 else "matmul"


def _read_shape_from(node: gs.Node, source: gs.Tensor, writer: Writer) -> None:
    """Turn `Shape(t, start, end)` of a removed tensor into `Slice(source, start, end)` (or `Identity`)
    of the tensor that holds the same shape."""
    start, end = node.attrs.get("start"), node.attrs.get("end")
    node.attrs.clear()
    node.inputs.clear()
    if start is None and end is None:
        node.op = "Identity"
        node.inputs.append(source)
        return
    bounds = [0 if start is None else int(start), np.iinfo(np.int64).max if end is None else int(end)]
    node.op = "Slice"
    node.inputs.extend(
        [
            source,
            writer.constant(node.name + "/starts", np.asarray(bounds[:1], dtype=np.int64)),
            writer.constant(node.name + "/ends", np.asarray(bounds[1:], dtype=np.int64)),
        ]
    )


def restore_sparse(new: onnx.ModelProto, old: onnx.ModelProto) -> None:
    """Put back the sparse initializers of `old` that `new` still uses.

    graphsurgeon turns a sparse initializer into a dense float64 one as soon as its values are read (the
    matcher reads channel constants); written like that, the model no longer type-checks.
    """
    sparse = {s.values.name: s for s in old.graph.sparse_initializer}
    densified = [t for t in new.graph.initializer if t.name in sparse]
    for dense in densified:
        new.graph.initializer.remove(dense)
    present = {s.values.name for s in new.graph.sparse_initializer}
    new.graph.sparse_initializer.extend(sparse[t.name] for t in densified if t.name not in present)
