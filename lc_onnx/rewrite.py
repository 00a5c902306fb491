"""Applying collapse decisions to a graphsurgeon graph.

Each head's output tensor keeps its name and consumers; the new layer is written the way the torch
exporters write `nn.Linear`: `Gemm(x, W.T, b, transB=1)` on rank-2 inputs, `MatMul(x, W)` then `Add(., b)`
on higher (or unknown) ranks, and no `Add` when no original layer had a bias. Old nodes are only cut
from their outputs; one `cleanup().toposort()` at the end of a round removes whatever became dead.
Weights are composed in float64 (by `decide`) and cast back to the original weight dtype here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lc_onnx.constants import Constants
from lc_onnx.decide import Collapse
from lc_onnx.sites import Linear, rank_of


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
        rank2 = first.is_gemm or rank_of(first.input) == 2
        for head in collapse.heads:
            base = (head.layer.nodes[0].name or first.nodes[0].name or "lc") + "/collapsed"
            weight = head.result.weight.astype(dtype)
            bias = head.result.bias.astype(dtype) if head.with_bias else None
            _emit(graph, namer, constants, base, first.input, head.layer, weight, bias, rank2)
    graph.cleanup().toposort()


def _emit(
    graph: gs.Graph,
    namer: Namer,
    constants: Constants,
    base: str,
    x: gs.Tensor,
    head: Linear,
    weight: np.ndarray,
    bias: np.ndarray | None,
    rank2: bool,
) -> None:
    out = head.output
    head.nodes[-1].outputs.clear()
    if rank2:
        inputs = [x, constants.add(namer(base + ".weight"), np.ascontiguousarray(weight.T))]
        if bias is not None:
            inputs.append(constants.add(namer(base + ".bias"), bias))
        graph.nodes.append(gs.Node("Gemm", namer(base), attrs={"transB": 1}, inputs=inputs, outputs=[out]))
        return
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
