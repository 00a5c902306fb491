"""Multiply-accumulate and parameter counts from shapes alone.

Counts what the matrix-multiplying ops cost at concrete input shapes: MatMul (broadcast batch dims, 1-D
operands, attention score and context products included), Gemm (transA/transB), Conv and ConvTranspose
(groups, any spatial rank). Elementwise ops, normalisations and softmax are not counted: they are the
part of the runtime a collapse does not shrink, and the bench report shows them separately.

Only dims are read, never tensor data, so a model loaded with `load_external_data=False` works, and a
model whose proto would exceed 2 GB works too: shapes come from `shapes.infer_shapes`, which runs on the
data-free skeleton.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import onnx
from onnx import TensorProto

from lc_onnx.model.protos import MS_DOMAIN, is_default_domain
from lc_onnx.model.shapes import Shape, attribute, infer_shapes

__all__ = ["MacCount", "count", "count_macs", "count_params", "macs_by_node"]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = frozenset(
    t
    for t in (
        TensorProto.FLOAT,
        TensorProto.DOUBLE,
        TensorProto.FLOAT16,
        TensorProto.BFLOAT16,
        getattr(TensorProto, "FLOAT8E4M3FN", None),
        getattr(TensorProto, "FLOAT8E4M3FNUZ", None),
        getattr(TensorProto, "FLOAT8E5M2", None),
        getattr(TensorProto, "FLOAT8E5M2FNUZ", None),
        getattr(TensorProto, "FLOAT4E2M1", None),
    )
    if t is not None
)


def _numel(dims: Iterable[int]) -> int:
    return math.prod(int(d) for d in dims)


def count_params(model: onnx.ModelProto) -> int:
    """Number of floating-point weights in the main graph, read from dims only.

    Counts every floating-point initializer and every floating-point tensor held by a `Constant` node of
    the main graph (`value`, `value_float`, `value_floats`). Integer tensors (shapes, indices) and
    subgraphs of control-flow ops are not counted.
    """
    graph = model.graph
    total = sum(_numel(t.dims) for t in graph.initializer if t.data_type in _FLOAT_TYPES)
    for node in graph.node:
        if node.op_type != "Constant" or not is_default_domain(node.domain):
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type in _FLOAT_TYPES:
                total += _numel(attr.t.dims)
            elif attr.name == "value_float":
                total += 1
            elif attr.name == "value_floats":
                total += len(attr.floats)
    return total


def _known(*shapes: Shape | None) -> bool:
    return all(s is not None and None not in s for s in shapes)


def _matmul_macs(a: Shape, b: Shape) -> int:
    a_mat = [1, a[0]] if len(a) == 1 else a[-2:]
    b_mat = [b[0], 1] if len(b) == 1 else b[-2:]
    batch_a, batch_b = a[:-2], b[:-2]
    rank = max(len(batch_a), len(batch_b))
    batch_a = [1] * (rank - len(batch_a)) + list(batch_a)
    batch_b = [1] * (rank - len(batch_b)) + list(batch_b)
    batch = math.prod(max(x, y) if min(x, y) != 0 else 0 for x, y in zip(batch_a, batch_b, strict=True))
    return batch * a_mat[0] * a_mat[1] * b_mat[1]


def _gemm_macs(node: onnx.NodeProto, a: Shape, b: Shape) -> int:
    m, k = (a[1], a[0]) if attribute(node, "transA", 0) else (a[0], a[1])
    n = b[0] if attribute(node, "transB", 0) else b[1]
    return m * k * n


def _conv_out_spatial(node: onnx.NodeProto, x: Shape, w: Shape) -> list[int]:
    spatial = x[2:]
    kernel = list(attribute(node, "kernel_shape", w[2:]))
    rank = len(spatial)
    strides = list(attribute(node, "strides", [1] * rank))
    dilations = list(attribute(node, "dilations", [1] * rank))
    pads = list(attribute(node, "pads", [0] * (2 * rank)))
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    out = []
    for i in range(rank):
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-spatial[i] // strides[i]))
            continue
        extent = dilations[i] * (kernel[i] - 1) + 1
        out.append((spatial[i] + pads[i] + pads[i + rank] - extent) // strides[i] + 1)
    return out


def _conv_macs(node: onnx.NodeProto, x: Shape, w: Shape, y: Shape | None) -> int:
    # w: [C_out, C_in / groups, *kernel]; each output element reads C_in / groups * prod(kernel) inputs.
    out_spatial = y[2:] if _known(y) and len(y) == len(x) else _conv_out_spatial(node, x, w)
    return x[0] * w[0] * math.prod(out_spatial) * w[1] * math.prod(w[2:])


def _conv_transpose_macs(x: Shape, w: Shape) -> int:
    # w: [C_in, C_out / groups, *kernel]; each input element scatters into C_out / groups * prod(kernel).
    return x[0] * w[0] * math.prod(x[2:]) * w[1] * math.prod(w[2:])


def _node_macs(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int | None:
    """MACs of one node, 0 for ops that are not counted, None when a needed shape is unknown."""
    if node.domain == MS_DOMAIN:
        return _contrib_macs(node, shapes)
    if not is_default_domain(node.domain):
        return 0
    op = node.op_type
    if op not in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
        return 0
    a, b = (shapes.get(name) for name in node.input[:2])
    if not _known(a, b):
        return None
    if op == "MatMul":
        return _matmul_macs(a, b)
    if op == "Gemm":
        return _gemm_macs(node, a, b)
    if op == "Conv":
        return _conv_macs(node, a, b, shapes.get(node.output[0]))
    return _conv_transpose_macs(a, b)


def _contrib_macs(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int | None:
    """MACs of onnxruntime's fused matrix ops: FusedMatMul, FusedGemm, Attention (the QKV projection and
    both attention products), MultiHeadAttention (both attention products); 0 for other contrib ops."""
    op = node.op_type
    if op not in ("FusedMatMul", "FusedGemm", "Attention", "MultiHeadAttention"):
        return 0
    a = shapes.get(node.input[0])
    b = shapes.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if op == "FusedMatMul":
        if not _known(a, b):
            return None
        a2 = a[:-2] + a[-2:][:: -1 if attribute(node, "transA", 0) else 1]
        b2 = b[:-2] + b[-2:][:: -1 if attribute(node, "transB", 0) else 1]
        return _matmul_macs(a2, b2)
    if op == "FusedGemm":
        return _gemm_macs(node, a, b) if _known(a, b) else None
    out = shapes.get(node.output[0])
    if op == "Attention":
        if not _known(a, b, out):
            return None
        batch, seq, hidden = a
        sizes = list(attribute(node, "qkv_hidden_sizes", []))
        q, v = (sizes[0], sizes[2]) if sizes else (b[1] // 3, b[1] // 3)
        return batch * seq * hidden * b[1] + batch * seq * seq * (q + v)
    # MultiHeadAttention: query [B, S, Hq]; key/value [B, L, H] (or already split per head)
    key = b
    if not _known(a, key, out) or len(a) != 3:
        return None
    kv_len = key[1] if len(key) == 3 else key[2]
    return a[0] * a[1] * kv_len * (a[2] + out[2])


def _walk(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in (attr.g,) if attr.HasField("g") else attr.graphs:
                yield from _walk(sub)


@dataclass(frozen=True)
class MacCount:
    """MACs per counted node (keyed by node name, unnamed nodes `"<op_type>_<index>"`), and the
    matrix-multiplying nodes whose operand shapes stayed unknown, so they are not in `total`."""

    by_node: dict[str, int]
    not_counted: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(self.by_node.values())


def count(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> MacCount:
    """MACs of every MatMul, Gemm, Conv and ConvTranspose node at concrete input shapes.

    Nodes inside control-flow subgraphs are counted once (a Loop body is not multiplied by its trip
    count). Nodes whose operand shapes stay unknown after shape inference are listed as not counted,
    with one warning.

    Args:
        model: the model; only dims are read, so external data need not be loaded.
        input_shapes: concrete dims per graph input name. Inputs not named use their static dims, with
            every symbolic dim set to 1.

    Raises:
        UserError: `input_shapes` names a value that is not a graph input, or gives a wrong rank.
    """
    graph, shapes = infer_shapes(model, input_shapes)
    result: dict[str, int] = {}
    unknown: list[str] = []
    for index, node in enumerate(_walk(graph)):
        macs = _node_macs(node, shapes)
        key = node.name or f"{node.op_type}_{index}"
        if key in result:
            key = f"{key}_{index}"
        if macs is None:
            unknown.append(key)
        elif macs or node.op_type in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
            result[key] = macs
    if unknown:
        logger.warning(
            "%d matmul/conv node(s) have unknown operand shapes and are not counted, e.g. %s",
            len(unknown),
            unknown[0],
        )
    return MacCount(result, tuple(unknown))


def macs_by_node(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, int]:
    """The counted nodes' MACs of `count`, keyed by node name."""
    return count(model, input_shapes).by_node


def count_macs(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> int:
    """Total multiply-accumulates of the counted MatMul, Gemm and Conv nodes of `count`."""
    return count(model, input_shapes).total
