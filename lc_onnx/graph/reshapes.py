"""Reasoning about reshapes and shapes inside a site, read-only.

Two questions the site finder asks: does a `Reshape`/`Flatten`/`Squeeze`/`Unsqueeze` only regroup the
leading axes of a tensor whose last axis holds the features (so rows of features stay rows, in order)?
And which tensor outside a site holds the shape of a tensor inside it (so that a `Shape` node reading the
inside can read that instead)? Shapes built at run time (`Concat` of `Shape`, `Slice`, `Gather`, ...), as
the torch exporters write them, are followed as far as they can be known without running the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from lc_onnx.graph.constant_eval import Constants

RESHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
# Ops a run-time shape entry passes through unchanged on its way from a `Shape` node.
_SHAPE_PASSTHROUGH = ("Unsqueeze", "Squeeze", "Gather", "Slice", "Identity", "Cast")


def rank_of(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


def keeps_last_axis(node: gs.Node, tensor: gs.Tensor, d: int, constants: Constants) -> bool:
    """True when a Reshape/Flatten/Squeeze/Unsqueeze only merges or splits the leading axes of a
    tensor whose last axis has `d` features (so rows of `d` values stay rows, in order)."""
    rank = rank_of(tensor)
    out = node.outputs[0]
    if node.op == "Reshape":
        if len(node.inputs) < 2:
            return False
        last, length = _last_shape_entry(node.inputs[1], tensor, d, constants)
        if last == d:
            return True
        if last == 0 and not node.attrs.get("allowzero", 0):
            return rank is not None and length == rank  # copies the input's last dim
        return last == -1 and out.shape is not None and len(out.shape) > 0 and out.shape[-1] == d
    if node.op == "Flatten":
        axis = int(node.attrs.get("axis", 1))
        return rank is not None and axis in (rank - 1, -1)
    axes = _axes(node, constants)
    if axes is None:
        return False
    if node.op == "Squeeze":
        return rank is not None and all(a not in (-1, rank - 1) for a in axes)
    out_rank = None if rank is None else rank + len(axes)
    return out_rank is not None and all(a not in (-1, out_rank - 1) for a in axes)


def shape_source(reshapes: Sequence[gs.Node], constants: Constants) -> gs.Tensor | None:
    """The shape of the tensors after the last of `reshapes` (the reshape nodes of a site, in order), as
    a tensor of the graph: that `Reshape`'s target when every entry is a real dim (a positive constant,
    or read from a `Shape`), never `-1` or `0`, so that it equals the shape it produces."""
    if not reshapes or reshapes[-1].op != "Reshape":
        return None
    target = reshapes[-1].inputs[1]
    value = constants.value(target)
    if value is not None:
        return target if np.all(np.asarray(value) > 0) else None
    node = target.inputs[0] if target.inputs else None
    if node is None or node.op != "Concat":
        return None
    return target if all(_real_dims(t, constants) for t in node.inputs) else None


def _real_dims(tensor: gs.Tensor, constants: Constants) -> bool:
    value = constants.value(tensor)
    if value is not None:
        return bool(np.all(np.asarray(value) > 0))
    node = tensor.inputs[0] if tensor.inputs else None
    while node is not None and node.op in _SHAPE_PASSTHROUGH:
        source = node.inputs[0]
        node = source.inputs[0] if source.inputs else None
    return node is not None and node.op == "Shape"


def _axes(node: gs.Node, constants: Constants) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and node.inputs[1].name:
        value = constants.value(node.inputs[1])
        return None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]
    return None if node.op == "Unsqueeze" else []  # Squeeze without axes: every 1-dim (unknowable)


def _last_shape_entry(
    shape: gs.Tensor, tensor: gs.Tensor, d: int, constants: Constants
) -> tuple[int | None, int | None]:
    """The last entry of a Reshape's target shape and the shape's length (None when unknown), for a
    Reshape of `tensor` (`d` features): from its value, or from the last input of the `Concat` that
    builds it at run time (exporters append the feature count, or read it off `tensor`)."""
    value = constants.value(shape)
    length = None if value is None else int(np.size(value))
    if value is None and shape.inputs and shape.inputs[0].op == "Concat" and shape.inputs[0].inputs:
        value = _shape_tail(shape.inputs[0].inputs[-1], tensor, d, constants)
    if value is None or np.size(value) == 0:
        return None, length
    return int(np.asarray(value).reshape(-1)[-1]), length


def _shape_tail(value_of: gs.Tensor, tensor: gs.Tensor, d: int, constants: Constants) -> np.ndarray | None:
    """A constant, or the last entry of a shape read at run time (`Slice(Shape(t), -1:)`,
    `Shape(t, start=-1)`, through `Squeeze`/`Unsqueeze`) when that dim is static or `t` is `tensor`
    (whose last dim is `d`)."""
    value = constants.value(value_of)
    if value is not None or not value_of.inputs:
        return value
    node = value_of.inputs[0]
    if node.op in ("Squeeze", "Unsqueeze", "Identity"):
        return _shape_tail(node.inputs[0], tensor, d, constants)
    if node.op == "Slice" and len(node.inputs) >= 3 and node.inputs[0].inputs:
        starts = constants.value(node.inputs[1])
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
