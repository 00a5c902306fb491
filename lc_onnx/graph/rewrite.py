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

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lc_onnx.graph.constants import Constants
from lc_onnx.graph.decide import Collapse
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


def apply(graph: gs.Graph, collapses: Sequence[Collapse], constants: Constants) -> None:
    """Rewrite `graph` in place: one new linear layer per head of every collapse."""
    namer = Namer(graph)
    for collapse in collapses:
        first = collapse.chain[0]
        dtype = np.asarray(constants.value(first.weight)).dtype
        for head in collapse.heads:
            base = (head.layer.core.name or first.core.name or "lc") + "/collapsed"
            weight = head.result.weight.astype(dtype)
            bias = head.result.bias.astype(dtype) if head.with_bias else None
            out = head.layer.output
            head.layer.nodes[-1].outputs.clear()
            target = out
            if head.reshape is not None:
                target = gs.Variable(namer(base + "/output"), dtype=out.dtype)
            if first.is_conv:
                _conv(
                    graph, namer, constants, base, first.input, target, weight, bias, -first.feature_axis - 1
                )
            else:
                emit = _gemm if first.is_gemm or rank_of(first.input) == 2 else _matmul
                emit(graph, namer, constants, base, first.input, target, weight, bias)
            if head.reshape is not None:
                shape = constants.add(namer(base + "/shape"), np.asarray(head.reshape, dtype=np.int64))
                graph.nodes.append(
                    gs.Node("Reshape", namer(base + "/Reshape"), inputs=[target, shape], outputs=[out])
                )
        for site in collapse.sites:
            for node, source in site.shape_users:
                _read_shape_from(node, source, namer, constants)
    graph.cleanup().toposort()


def _read_shape_from(node: gs.Node, source: gs.Tensor, namer: Namer, constants: Constants) -> None:
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
            constants.add(namer(node.name + "/starts"), np.asarray(bounds[:1], dtype=np.int64)),
            constants.add(namer(node.name + "/ends"), np.asarray(bounds[1:], dtype=np.int64)),
        ]
    )


def _gemm(graph, namer, constants, base, x, out, weight, bias) -> None:
    inputs = [x, constants.add(namer(base + ".weight"), np.ascontiguousarray(weight.T))]
    if bias is not None:
        inputs.append(constants.add(namer(base + ".bias"), bias))
    graph.nodes.append(gs.Node("Gemm", namer(base), attrs={"transB": 1}, inputs=inputs, outputs=[out]))


def _conv(graph, namer, constants, base, x, out, weight, bias, spatial: int) -> None:
    """A 1x1 convolution over `spatial` dims: the weight `[d_out, d_in, 1, ...]`."""
    kernel = np.ascontiguousarray(weight.T).reshape(weight.shape[1], weight.shape[0], *([1] * spatial))
    inputs = [x, constants.add(namer(base + ".weight"), kernel)]
    if bias is not None:
        inputs.append(constants.add(namer(base + ".bias"), bias))
    attrs = {"kernel_shape": [1] * spatial}
    graph.nodes.append(gs.Node("Conv", namer(base), attrs=attrs, inputs=inputs, outputs=[out]))


def _matmul(graph, namer, constants, base, x, out, weight, bias) -> None:
    w = constants.add(namer(base + ".weight"), np.ascontiguousarray(weight))
    if bias is None:
        graph.nodes.append(gs.Node("MatMul", namer(base), inputs=[x, w], outputs=[out]))
        return
    mm = gs.Variable(namer(base + "/MatMul_output_0"), dtype=out.dtype, shape=out.shape)
    graph.nodes.append(gs.Node("MatMul", namer(base + "/MatMul"), inputs=[x, w], outputs=[mm]))
    b = constants.add(namer(base + ".bias"), bias)
    graph.nodes.append(gs.Node("Add", namer(base + "/Add"), inputs=[mm, b], outputs=[out]))


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
