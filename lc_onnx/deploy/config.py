"""An ONNX graph's inputs and outputs as a Triton `config.pbtxt` for the onnxruntime backend.

Only the graph's declarations are read (names, element types, shapes), never tensor data, so a model
loaded without its external data works. Mapping rules:

- Element types map one to one onto Triton's `TYPE_*` (`FLOAT` -> `TYPE_FP32`, `BFLOAT16` -> `TYPE_BF16`,
  `STRING` -> `TYPE_STRING`, ...); types Triton has no name for (complex, float8, 4-bit) are refused.
- A symbolic or unknown dimension is `-1`.
- With `max_batch_size > 0` Triton adds the batch dimension itself, so every input and output must have
  a leading dynamic dimension and the config lists the dims after it. A tensor whose only dimension is the
  batch (or a scalar when `max_batch_size == 0`) is declared as `dims: [1]` with an empty `reshape { }`,
  Triton's spelling for "no dims of its own".

The text is written by protobuf's `text_format` from Triton's `ModelConfig` message (`model_config`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx
from google.protobuf.message import Message

from lc_onnx.deploy import model_config
from lc_onnx.deploy.options import ACCELERATORS, INSTANCE_KINDS
from lc_onnx.errors import UserError, one_line
from lc_onnx.model.protos import dims_of

TRITON_DYNAMIC_DIM = -1  # how a Triton model configuration writes a dim of any size

TensorProto = onnx.TensorProto
PLATFORM = "onnxruntime_onnx"

TRITON_DTYPES: dict[int, str] = {
    TensorProto.BOOL: "TYPE_BOOL",
    TensorProto.UINT8: "TYPE_UINT8",
    TensorProto.UINT16: "TYPE_UINT16",
    TensorProto.UINT32: "TYPE_UINT32",
    TensorProto.UINT64: "TYPE_UINT64",
    TensorProto.INT8: "TYPE_INT8",
    TensorProto.INT16: "TYPE_INT16",
    TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT64: "TYPE_INT64",
    TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.STRING: "TYPE_STRING",
    TensorProto.BFLOAT16: "TYPE_BF16",
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as ONNX declares it; `dims` uses -1 for symbolic or unknown sizes."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    dynamic_leading: bool

    def config_dims(self, batched: bool) -> tuple[tuple[int, ...], bool]:
        """(dims for the config, whether a `reshape { shape: [ ] }` is needed)."""
        dims = self.dims[1:] if batched else self.dims
        return (dims, False) if dims else ((1,), True)


@dataclass(frozen=True)
class Signature:
    """The graph's interface: what every version under one Triton config must share."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def batchable(self) -> bool:
        """True when every input and output starts with a dynamic dimension Triton can batch along."""
        return all(t.dynamic_leading for t in (*self.inputs, *self.outputs))

    def first_unbatchable(self) -> TensorSpec | None:
        return next((t for t in (*self.inputs, *self.outputs) if not t.dynamic_leading), None)


@dataclass(frozen=True)
class TritonConfig:
    """Everything `config.pbtxt` says, already validated; `to_proto` and `to_pbtxt` only spell it."""

    name: str
    signature: Signature
    max_batch_size: int
    instance_kind: str = "cpu"
    instances: int = 1
    dynamic_batching: bool = False
    accelerator: str = "none"

    def to_proto(self) -> Message:
        """The config as Triton's `ModelConfig` message (see `model_config`)."""
        batched = self.max_batch_size > 0
        config = model_config.ModelConfig(
            name=self.name, platform=PLATFORM, max_batch_size=self.max_batch_size
        )
        for declared, specs in (
            (config.input, self.signature.inputs),
            (config.output, self.signature.outputs),
        ):
            for spec in specs:
                dims, reshape = spec.config_dims(batched)
                tensor = declared.add(name=spec.name, data_type=spec.data_type, dims=dims)
                if reshape:
                    tensor.reshape.SetInParent()
        config.instance_group.add(kind=f"KIND_{self.instance_kind.upper()}", count=self.instances)
        if self.dynamic_batching:
            config.dynamic_batching.SetInParent()
        if self.accelerator != "none":
            config.optimization.execution_accelerators.gpu_execution_accelerator.add(name=self.accelerator)
        return config

    def to_pbtxt(self) -> str:
        """`config.pbtxt`: the protobuf text format of `to_proto()`, deterministic for equal configs."""
        return model_config.to_text(self.to_proto())


def signature_of(model: onnx.ModelProto) -> Signature:
    """Read the graph's inputs (initializer-backed ones excluded, as onnxruntime does) and outputs.

    Outputs without a declared shape get one from ONNX shape inference; if that fails too, UserError.
    """
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    outputs = list(graph.output)
    if any(not _has_shape(v) for v in outputs):
        outputs = _inferred_outputs(model)
    inputs = tuple(_spec(v, "input") for v in graph.input if v.name not in initializers)
    if not inputs:
        raise UserError("the model has no graph inputs; Triton needs at least one")
    return Signature(inputs=inputs, outputs=tuple(_spec(v, "output") for v in outputs))


def build_config(
    model: onnx.ModelProto,
    name: str,
    *,
    max_batch_size: int | None = None,
    default_max_batch_size: int = 8,
    instance_kind: str = "cpu",
    instances: int = 1,
    dynamic_batching: bool = False,
    accelerator: str = "none",
) -> TritonConfig:
    """Validate the options against the graph and return the config.

    Args:
        max_batch_size: None picks `default_max_batch_size` when every input and output has a leading
            dynamic dimension and 0 otherwise; an explicit value above 0 on a graph without one is a
            UserError.
    """
    signature = signature_of(model)
    if max_batch_size is None:
        max_batch_size = default_max_batch_size if signature.batchable else 0
    if max_batch_size < 0:
        raise UserError(
            f"{{max_batch_size}} must be 0 or more, got {max_batch_size}", params=["max_batch_size"]
        )
    if max_batch_size > 0 and not signature.batchable:
        bad = signature.first_unbatchable()
        assert bad is not None
        raise UserError(
            f"{{max_batch_size}} {max_batch_size} needs a leading dynamic batch dimension on every input and "
            f"output, but {bad.name!r} has shape {_shape_text(bad.dims)}; use {{max_batch_size}} 0 to serve "
            "full shapes",
            params=["max_batch_size"],
        )
    if dynamic_batching and max_batch_size == 0:
        raise UserError(
            "{dynamic_batching} needs {max_batch_size} above 0 (Triton batches along dim 0)",
            params=["dynamic_batching", "max_batch_size"],
        )
    if instance_kind not in INSTANCE_KINDS:
        raise UserError(
            f"{{instance_kind}} must be one of {', '.join(INSTANCE_KINDS)}, got {instance_kind!r}",
            params=["instance_kind"],
        )
    if instances < 1:
        raise UserError(f"{{instances}} must be 1 or more, got {instances}", params=["instances"])
    if accelerator not in ACCELERATORS:
        raise UserError(
            f"{{accelerator}} must be one of {', '.join(ACCELERATORS)}, got {accelerator!r}",
            params=["accelerator"],
        )
    if accelerator != "none" and instance_kind != "gpu":
        raise UserError(
            f"{{accelerator}} {accelerator} runs on GPU instances; use {{instance_kind}} gpu",
            params=["accelerator", "instance_kind"],
        )
    return TritonConfig(
        name=name,
        signature=signature,
        max_batch_size=max_batch_size,
        instance_kind=instance_kind,
        instances=instances,
        dynamic_batching=dynamic_batching,
        accelerator=accelerator,
    )


def _spec(value: onnx.ValueInfoProto, role: str) -> TensorSpec:
    if not value.type.HasField("tensor_type"):
        kind = value.type.WhichOneof("value") or "unknown"
        raise UserError(f"{role} {value.name!r} is a {kind}, not a tensor; Triton serves tensors only")
    tensor_type = value.type.tensor_type
    elem = tensor_type.elem_type
    if elem not in TRITON_DTYPES:
        raise UserError(
            f"{role} {value.name!r} has element type {_elem_name(elem)}, which Triton cannot serve"
        )
    known = dims_of(value)
    if known is None:
        raise UserError(f"{role} {value.name!r} has no shape, not even a rank; Triton needs dims")
    dims = tuple(TRITON_DYNAMIC_DIM if d is None else d for d in known)
    return TensorSpec(
        name=value.name,
        data_type=TRITON_DTYPES[elem],
        dims=dims,
        dynamic_leading=bool(dims) and dims[0] == TRITON_DYNAMIC_DIM,
    )


def _has_shape(value: onnx.ValueInfoProto) -> bool:
    return value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape")


def _inferred_outputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # inference raises several types; any failure means "no shape known"
        missing = next(v.name for v in model.graph.output if not _has_shape(v))
        raise UserError(
            f"output {missing!r} has no shape and shape inference failed ({one_line(exc)})"
        ) from None
    by_name = {v.name: v for v in (*inferred.graph.output, *inferred.graph.value_info)}
    return [v if _has_shape(v) else by_name.get(v.name, v) for v in model.graph.output]


def _elem_name(elem: int) -> str:
    try:
        return TensorProto.DataType.Name(elem)
    except ValueError:
        return str(elem)


def _shape_text(dims: Sequence[int]) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in dims) + "]"
