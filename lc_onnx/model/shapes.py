"""Shapes of every value at concrete input dims, read from dims alone (no tensor data).

ONNX shape inference, continued through onnxruntime's `com.microsoft` ops, which onnx does not know, and
through the small integer values (shape computations, position ids) that concrete input shapes determine.
It runs on `io.skeleton`, the data-free copy of a model, so models with external data or over 2 GB work.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lc_onnx.errors import UserError
from lc_onnx.model import io
from lc_onnx.model.protos import MS_DOMAIN, dims_of, is_default_domain

__all__ = ["Shape", "attribute", "infer", "infer_shapes"]

logger = logging.getLogger(__name__)

Shape = list  # list[int | None]; None is a dim shape inference could not pin down.
# A dynamic input dim that `input_shapes` does not set: shapes then hold for a batch of one.
UNKNOWN_INPUT_DIM = 1


def _input_dims(value: onnx.ValueInfoProto, override: Sequence[int] | None) -> tuple[int, list[int]] | None:
    if not value.type.HasField("tensor_type"):
        return None
    elem = value.type.tensor_type.elem_type
    known = dims_of(value)
    if override is None:
        return elem, [UNKNOWN_INPUT_DIM if d is None else d for d in known or []]
    dims = [int(d) for d in override]
    if known is not None and len(dims) != len(known):
        raise UserError(
            f"input {value.name!r} has rank {len(known)}, but {{input_shapes}} gives {len(dims)} dims {dims}",
            params=["input_shapes"],
        )
    for d, fixed in zip(dims, known or [], strict=False):
        if d < 0:
            raise UserError(
                f"input {value.name!r}: negative dim {d} in {{input_shapes}}", params=["input_shapes"]
            )
        if fixed is not None and fixed != d:
            raise UserError(
                f"input {value.name!r} has a fixed dim {fixed}, but {{input_shapes}} gives {d}",
                params=["input_shapes"],
            )
    return elem, dims


def _skeleton(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """`io.skeleton` of the model with concrete input dims and nothing inferred yet, functions inlined."""
    src = model.graph
    init_names = {t.name for t in src.initializer}
    real_inputs = [v for v in src.input if v.name not in init_names]
    unknown = sorted(set(input_shapes) - {v.name for v in real_inputs})
    if unknown:
        names = ", ".join(v.name for v in real_inputs)
        raise UserError(
            f"{{input_shapes}} names {unknown[0]!r}, which is not a graph input (inputs: {names})",
            params=["input_shapes"],
        )
    skeleton = io.skeleton(model)
    graph = skeleton.graph
    inputs = [v for v in graph.input if v.name in init_names]
    for value in real_inputs:
        typed = _input_dims(value, input_shapes.get(value.name))
        inputs.append(value if typed is None else helper.make_tensor_value_info(value.name, *typed))
    outputs = [
        helper.make_tensor_value_info(
            v.name, v.type.tensor_type.elem_type if v.type.HasField("tensor_type") else 0, None
        )
        for v in src.output
    ]
    for field, values in (("input", inputs), ("output", outputs), ("value_info", [])):
        del getattr(graph, field)[:]
        getattr(graph, field).extend(values)
    if skeleton.functions:
        try:
            skeleton = onnx.inliner.inline_local_functions(skeleton)
        except Exception as exc:  # a malformed function must not stop the count
            logger.warning("could not inline local functions (%s); their MACs are not counted", exc)
    return skeleton


# onnxruntime's contrib ops whose first output has the first input's shape (and type).
_SAME_SHAPE = frozenset(
    {
        "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "BiasAdd", "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "BiasSoftmax", "RotaryEmbedding",
        "BiasDropout", "LayerNormalization",
    }
)  # fmt: skip
_MAX_ROUNDS = 64


def infer(model: onnx.ModelProto, *, data_prop: bool = False) -> onnx.ModelProto:
    """ONNX shape inference, continued through onnxruntime's `com.microsoft` ops (which onnx does not
    know): their outputs' shapes are derived from their inputs', written as value_info, and inference
    runs again, until nothing more is learnt. `model` is a skeleton (no large data)."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=data_prop)
    added: dict[str, onnx.ValueInfoProto] = {}
    for _ in range(_MAX_ROUNDS):
        types = {
            v.name: v.type
            for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)
        }
        types.update(
            (t.name, helper.make_tensor_type_proto(t.data_type, list(t.dims)))
            for t in model.graph.initializer
        )
        new = {}
        for node in inferred.graph.node:
            if (
                node.domain != MS_DOMAIN
                or not node.output
                or node.output[0] in types
                or node.output[0] in added
            ):
                continue
            for value in _contrib_outputs(node, types):
                new[value.name] = value
        if not new:
            break
        added.update(new)
        retry = onnx.ModelProto()
        retry.CopyFrom(model)
        retry.graph.value_info.extend(added.values())
        inferred = onnx.shape_inference.infer_shapes(retry, data_prop=data_prop)
    return inferred


# Integer ops that shape computations are made of: evaluated on small known values by `_fold_shape_values`.
_SHAPE_OPS = frozenset(
    {
        "Cast", "Concat", "Gather", "Slice", "Squeeze", "Unsqueeze", "Reshape", "Identity", "Add", "Sub",
        "Mul", "Div", "Min", "Max", "Range", "Equal", "Where", "Expand", "ConstantOfShape", "ReduceProd",
        # window padding, `(w - n % w) % w`, as the torchscript exporter writes Swin's
        "Mod", "Neg", "Abs", "Floor", "Ceil", "Transpose", "Less", "Greater", "Not", "And", "Or", "Size",
    }
)  # fmt: skip
_SMALL = 4096  # elements: shape values, index ranges such as position ids


def _fold_shape_values(inferred: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The values of integer tensors that concrete input shapes determine, not yet initializers.

    ONNX shape inference reads a `Slice`'s bounds or a `Reshape`'s target only from initializers; the
    exporters compute them from `Shape` at run time (a transformers encoder slices its position ids to the
    sequence length). At concrete input shapes those are constants: `Shape` of a tensor whose dims are all
    known, small integer initializers and `Constant`s, and `_SHAPE_OPS` over them (evaluated with
    `onnx.reference`). Returned as initializers for the next round of inference.
    """
    from onnx.reference import ReferenceEvaluator

    graph = inferred.graph
    opset = next((o.version for o in inferred.opset_import if is_default_domain(o.domain)), 17)
    shapes = {v.name: dims_of(v) for v in (*graph.input, *graph.value_info, *graph.output)}
    known = {
        t.name: numpy_helper.to_array(t)
        for t in graph.initializer
        if t.data_location != TensorProto.EXTERNAL
        and math.prod(t.dims) <= _SMALL
        and t.data_type != TensorProto.STRING
    }
    new: dict[str, np.ndarray] = {}
    for node in graph.node:
        if not is_default_domain(node.domain) or not node.output or node.output[0] in known:
            continue
        if node.op_type == "Constant":
            if not _small_constant(node):  # a weight, or a data-free stub: no shape is computed from it
                continue
            values = ReferenceEvaluator(node, opsets={"": opset}).run(None, {})
        elif node.op_type == "Shape":
            dims = shapes.get(node.input[0])
            if dims is None or not all(isinstance(d, int) for d in dims):
                continue
            values = ReferenceEvaluator(node, opsets={"": opset}).run(
                None, {node.input[0]: np.empty(dims, np.int8)}
            )
        elif node.op_type in _SHAPE_OPS and all(not i or i in known for i in node.input):
            feeds = {i: known[i] for i in node.input if i}
            if any(v.size > _SMALL for v in feeds.values()):
                continue
            try:
                values = ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)
            except Exception:  # an op the reference cannot run here: leave its shape unknown
                continue
        else:
            continue
        arrays = [np.asarray(v) for v in values]
        # Shapes, indices and masks only, and every output of the node or none (a node whose outputs
        # were only partly initializers would define a value twice).
        if any(a.size > _SMALL or a.dtype.kind not in "iub" for a in arrays):
            continue
        for name, value in zip(node.output, arrays):
            known[name] = value
            if node.op_type != "Constant":
                new[name] = value
    produced = {o for n in graph.node if n.op_type != "Constant" for o in n.output}
    return [numpy_helper.from_array(v, name) for name, v in new.items() if name in produced]


def _small_constant(node: onnx.NodeProto) -> bool:
    """A `Constant` whose value is small and held in the node (not a tensor stub of the skeleton)."""
    for attr in node.attribute:
        if attr.name == "value" and (
            attr.t.data_location == TensorProto.EXTERNAL or math.prod(attr.t.dims) > _SMALL
        ):
            return False
    return True


def _replace_by_constants(graph: onnx.GraphProto, values: list[onnx.TensorProto]) -> None:
    """Make `values` initializers and drop the nodes that computed them (`_fold_shape_values` folds every
    output of a node or none)."""
    names = {v.name for v in values}
    kept = [n for n in graph.node if not any(o in names for o in n.output)]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(values)


def _contrib_outputs(node: onnx.NodeProto, types: Mapping[str, onnx.TypeProto]) -> list[onnx.ValueInfoProto]:
    """Value infos for the outputs of a `com.microsoft` node whose input shapes are known."""
    inputs = [dims_of(types[name], symbolic=True) if name in types else None for name in node.input]
    if not inputs or inputs[0] is None:
        return []
    elem = types[node.input[0]].tensor_type.elem_type
    a = inputs[0]
    op = node.op_type
    out: list | None = None
    if op in _SAME_SHAPE:
        out = a
    elif op == "FusedMatMul" and len(inputs) > 1 and inputs[1] is not None:
        out = _fused_matmul_shape(node, a, inputs[1])
    elif op == "Attention" and len(inputs) > 1 and inputs[1] is not None and len(a) == 3:
        sizes = list(attribute(node, "qkv_hidden_sizes", []))
        width = inputs[1][1]
        v = sizes[2] if sizes else (width // 3 if isinstance(width, int) else None)
        out = [a[0], a[1], v]
    elif op == "MultiHeadAttention" and len(a) == 3:
        value = inputs[2] if len(inputs) > 2 else None
        out = [a[0], a[1], value[-1] if value is not None and len(value) == 3 else a[2]]
    elif op == "EmbedLayerNormalization" and len(inputs) > 2 and inputs[2] is not None:
        elem = types[node.input[2]].tensor_type.elem_type
        values = [helper.make_tensor_value_info(node.output[0], elem, [a[0], a[1], inputs[2][1]])]
        if len(node.output) > 1 and node.output[1]:
            values.append(helper.make_tensor_value_info(node.output[1], TensorProto.INT32, [a[0]]))
        return values
    if out is None:
        return []
    return [helper.make_tensor_value_info(node.output[0], elem, out)]


def _fused_matmul_shape(node: onnx.NodeProto, a: list, b: list) -> list | None:
    if len(a) < 2 or len(b) < 2:
        return None
    a = a[:-2] + a[-2:][:: -1 if attribute(node, "transA", 0) else 1]
    b = b[:-2] + b[-2:][:: -1 if attribute(node, "transB", 0) else 1]
    batch = a[:-2] if len(a) >= len(b) else b[:-2]
    return [*batch, a[-2], b[-1]]


def infer_shapes(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> tuple[onnx.GraphProto, dict[str, Shape]]:
    """Shapes of every value at concrete input dims, without touching tensor data.

    Args:
        model: the model; its initializers may lack their data.
        input_shapes: concrete dims per graph input name. Inputs not named use their static dims, with
            every symbolic dim set to 1.

    Returns:
        The graph whose nodes the shapes describe (local functions inlined) and a map from value name to
        its dims, where a dim shape inference could not determine is `None`.

    Raises:
        UserError: `input_shapes` names a value that is not a graph input, or gives a wrong rank.
    """
    skeleton = _skeleton(model, input_shapes or {})
    try:
        inferred = infer(skeleton, data_prop=True)
        for _ in range(_MAX_ROUNDS):
            folded = _fold_shape_values(inferred)
            if not folded:
                break
            _replace_by_constants(skeleton.graph, folded)
            inferred = infer(skeleton, data_prop=True)
    except Exception as exc:  # inference bugs on exotic graphs: count what the inputs alone give
        logger.warning("shape inference failed (%s); MACs of ops with unknown shapes are not counted", exc)
        inferred = skeleton
    shapes: dict[str, Shape] = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        shape = dims_of(value)
        if shape is not None:
            shapes[value.name] = shape
    for tensor in model.graph.initializer:
        shapes[tensor.name] = [int(d) for d in tensor.dims]
    for node in inferred.graph.node:
        _collect_subgraph_shapes(node, shapes)
    return inferred.graph, shapes


def _collect_subgraph_shapes(node: onnx.NodeProto, shapes: dict[str, Shape]) -> None:
    for attr in node.attribute:
        for sub in (attr.g,) if attr.HasField("g") else attr.graphs:
            for value in (*sub.input, *sub.value_info, *sub.output):
                shape = dims_of(value)
                if shape is not None:
                    shapes.setdefault(value.name, shape)
            for tensor in sub.initializer:
                shapes.setdefault(tensor.name, [int(d) for d in tensor.dims])
            for inner in sub.node:
                _collect_subgraph_shapes(inner, shapes)


def attribute(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default
