"""Verification inputs that exercise a model: shapes a real input could have, and token ids that index
real rows.

Random inputs at dynamic dims of 2 can prove nothing: a detector sees a 2x2 image whose outputs are the
same whatever the weights. Without shapes from the user, dynamic dims are set as real inputs have them:

- the batch (a dynamic first dim) is `BATCH`;
- the height and width of an image-like input (`[N, C, H, W]` with a static `C`) are `IMAGE_SIDE`, or the
  product of the graph's strides when that is larger, so that every downsampling stage sees more than one
  pixel;
- any other dynamic dim (a sequence) is `SEQUENCE`.

Integer inputs that index a table (`Gather` of a constant, through casts and reshapes: token, position
and segment ids) are drawn from its rows, not left at 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

from lc_onnx.model.protos import dims_of, is_default_domain

BATCH = 2
IMAGE_SIDE = 224
SEQUENCE = 32
MAX_IMAGE_SIDE = 2048  # a cap on the stride product, for graphs with many strided branches
_STRIDED = ("Conv", "MaxPool", "AveragePool", "LpPool")
# Ops an index tensor may pass through between a graph input and the Gather it indexes.
_INDEX_PASSTHROUGH = ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand")


def dims(value: onnx.ValueInfoProto, side: int) -> tuple[int, ...] | None:
    """The exercising dims of graph input `value` (None when it has no known rank); `side` is
    `image_side(model)`."""
    known = dims_of(value)
    if known is None:
        return None
    image = len(known) == 4 and known[1] is not None
    out = []
    for axis, d in enumerate(known):
        if d is not None:
            out.append(d)
        elif axis == 0:
            out.append(BATCH)
        else:
            out.append(side if image and axis >= 2 else SEQUENCE)
    return tuple(out)


def image_side(model: onnx.ModelProto) -> int:
    """`IMAGE_SIDE`, or the product of the strides of the main graph's strided ops when larger."""
    product = 1
    for node in model.graph.node:
        if node.op_type in _STRIDED and is_default_domain(node.domain):
            for attr in node.attribute:
                if attr.name == "strides" and attr.ints:
                    product *= max(int(s) for s in attr.ints)
    return max(IMAGE_SIDE, min(product, MAX_IMAGE_SIDE))


def index_rows(model: onnx.ModelProto) -> dict[str, int]:
    """Integer graph inputs that index a constant table with `Gather`, and the table's row count (the
    smallest, when one input indexes several)."""
    graph = model.graph
    tables = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    tables[node.output[0]] = list(attr.t.dims)
    producers = {out: node for node in graph.node for out in node.output}
    inputs = {v.name for v in graph.input} - {t.name for t in graph.initializer}
    rows: dict[str, int] = {}
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[0] not in tables:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        table = tables[node.input[0]]
        if not table or not -len(table) <= axis < len(table):
            continue
        source = _index_source(node.input[1], producers, inputs)
        if source is not None and table[axis] > 0:
            rows[source] = min(rows.get(source, table[axis]), int(table[axis]))
    return rows


def _index_source(name: str, producers: Mapping[str, onnx.NodeProto], inputs: set[str]) -> str | None:
    for _ in range(8):
        if name in inputs:
            return name
        node = producers.get(name)
        if node is None or node.op_type not in _INDEX_PASSTHROUGH or not node.input:
            return None
        name = node.input[0]
    return None
