"""onnxruntime access: the import with a helpful message, sessions, and input feeds.

onnxruntime comes from the `cpu` or `gpu` extra (never both: they install the same module).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx

from lc_onnx.errors import UserError

DEFAULT_DYNAMIC_DIM = 2


def import_ort() -> ModuleType:
    """The onnxruntime module, or a `UserError` that says which extra to install."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(
            "onnxruntime is not installed: pip install 'lc-onnx[cpu]' (or 'lc-onnx[gpu]' on a CUDA machine)"
        ) from None
    return onnxruntime


def make_session(
    model: str | os.PathLike | bytes,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int | None = None,
    optimization: str = "basic",
):
    """An `InferenceSession` for a model path or serialized bytes.

    `optimization` is "disable", "basic", "extended" or "all" (onnxruntime's graph optimization levels).
    """
    ort = import_ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = str(model) if isinstance(model, (str, os.PathLike)) else model
    try:
        return ort.InferenceSession(source, sess_options=options, providers=list(providers))
    except Exception as exc:
        name = Path(source).name if isinstance(source, str) else "model"
        raise UserError(f"onnxruntime cannot load {name}: {_one_line(exc)}") from None


def parse_input_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse `name:1x3x224x224` specs (as given to `--input-shape`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
            if any(d < 0 for d in shape):
                raise ValueError
        except ValueError:
            raise UserError(
                f"--input-shape {spec!r}: expected NAME:DxDx... (for example x:1x3x224x224)"
            ) from None
        shapes[name] = shape
    return shapes


def input_shapes(
    model: onnx.ModelProto, overrides: Mapping[str, Sequence[int]] | None = None
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for the graph inputs: static dims kept, dynamic ones set small, `overrides` win."""
    overrides = dict(overrides or {})
    initializers = {t.name for t in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.name in overrides:
            shapes[value.name] = tuple(int(d) for d in overrides.pop(value.name))
            continue
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            raise UserError(
                f"input {value.name!r} has no known rank; give its shape with --input-shape {value.name}:DxD..."
            )
        shapes[value.name] = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else DEFAULT_DYNAMIC_DIM
            for d in tensor_type.shape.dim
        )
    if overrides:
        names = ", ".join(sorted(overrides))
        raise UserError(f"--input-shape names unknown input(s): {names}")
    return shapes


def random_feeds(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], *, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs: standard normal for floats, zeros for integers and booleans (safe as indices)."""
    rng = np.random.default_rng(seed)
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    feeds = {}
    for name, shape in shapes.items():
        elem = types[name]
        if elem == 0:
            raise UserError(f"input {name!r} is not a tensor; lc-onnx verifies tensor inputs only")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        if np.issubdtype(dtype, np.floating) or elem == onnx.TensorProto.BFLOAT16:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = np.zeros(shape, dtype=dtype)
    return feeds


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(exc).__name__
