"""onnxruntime sessions for in-memory protos whose large weights stay on disk.

`io.load` leaves large tensors in their files (external data, or references into the `.onnx` itself).
A changed proto (extra outputs for statistics, a candidate fused graph) cannot be handed to onnxruntime
as bytes with such references, so the weights are passed as `OrtValue`s over the memory-mapped arrays
(`SessionOptions.add_external_initializers`): nothing is copied to a temporary file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from lc_onnx import io, runtime
from lc_onnx.errors import UserError


def make_session(proto: onnx.ModelProto, base_dir: Path | None):
    """An `InferenceSession` (CPU) for `proto`; external initializers are read from `base_dir`."""
    ort = runtime.import_ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    names, values = [], []
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names.append(tensor.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(np.asarray(io.read_tensor(tensor, base_dir))))
    if names:
        options.add_external_initializers(names, values)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in io.iter_tensors(proto)) and not names:
        raise UserError("external data outside the main graph's initializers is not supported by calibration")
    try:
        session = ort.InferenceSession(
            proto.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise UserError(f"onnxruntime cannot load the model: {runtime._one_line(exc)}") from None
    session._lc_keep = values  # the OrtValues must outlive the session
    return session


def with_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A shallow-data copy of `proto` whose graph also outputs the tensors `names` (types inferred by
    onnxruntime). External tensors stay references, so the copy is small."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    existing = {o.name for o in out.graph.output}
    for name in names:
        if name not in existing:
            out.graph.output.append(onnx.ValueInfoProto(name=name))
            existing.add(name)
    return out


def run(session, feed: Mapping[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """One run; a failure is the data's fault (the model itself loaded)."""
    names = list(names) if names is not None else [o.name for o in session.get_outputs()]
    try:
        return dict(zip(names, session.run(names, dict(feed))))
    except Exception as exc:
        raise UserError(
            f"onnxruntime cannot run the model on the calibration data: {runtime._one_line(exc)}"
        ) from None
