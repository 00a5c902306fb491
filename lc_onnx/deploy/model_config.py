"""Triton's `ModelConfig` message, cut down to the fields lc-onnx writes, and its text format.

Triton reads `config.pbtxt` as the protobuf text format of `inference.ModelConfig` (`model_config.proto`
in triton-inference-server/common). The full generated module ships in tritonclient, an optional extra;
deploy needs only protobuf (always installed: onnx depends on it), so the message is declared here at
import time from a `FileDescriptorProto` holding exactly the fields below, with Triton's names, numbers,
types and enum values (tests/deploy/test_model_config.py checks them against tritonclient's module). It
lives in a private descriptor pool, so it never clashes with the real module when both are loaded.

`to_text` formats a message deterministically (fields in number order); `parse` reads one back and
refuses any field that is not declared here; `difference` says where two configs first differ. Being a
proto3 message like Triton's own, a config compares as Triton reads it: spacing, field order, list syntax
and comments make no difference, and a zero is the same as no value (so `to_text` leaves out
`max_batch_size: 0`, which is what Triton assumes without it).
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import Message

# The values of Triton's enums, in number order (each value's number is its index).
DATA_TYPES = (
    "TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8",
    "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING",
    "TYPE_BF16",
)  # fmt: skip
KINDS = ("KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL")

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {"string": _F.TYPE_STRING, "int32": _F.TYPE_INT32, "int64": _F.TYPE_INT64}


def _field(
    name: str, number: int, kind: str, *, repeated: bool = False
) -> descriptor_pb2.FieldDescriptorProto:
    """A field of scalar `kind`, or of the message or enum (`enum:` prefix) of that name in `inference`."""
    field = _F(name=name, number=number, label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    if kind in _SCALARS:
        field.type = _SCALARS[kind]
    else:
        enum, _, type_name = kind.rpartition(":")
        field.type = _F.TYPE_ENUM if enum else _F.TYPE_MESSAGE
        field.type_name = f".inference.{type_name}"
    return field


def _enum(name: str, values: tuple[str, ...]) -> descriptor_pb2.EnumDescriptorProto:
    return descriptor_pb2.EnumDescriptorProto(
        name=name,
        value=[descriptor_pb2.EnumValueDescriptorProto(name=v, number=i) for i, v in enumerate(values)],
    )


def _schema() -> descriptor_pb2.FileDescriptorProto:
    schema = descriptor_pb2.FileDescriptorProto(
        name="lc_onnx/deploy/model_config.proto", package="inference", syntax="proto3"
    )
    schema.enum_type.append(_enum("DataType", DATA_TYPES))
    add = schema.message_type.add
    add(name="ModelTensorReshape", field=[_field("shape", 1, "int64", repeated=True)])
    for message, dims_number in (("ModelInput", 4), ("ModelOutput", 3)):
        add(
            name=message,
            field=[
                _field("name", 1, "string"),
                _field("data_type", 2, "enum:DataType"),
                _field("dims", dims_number, "int64", repeated=True),
                _field("reshape", 5, "ModelTensorReshape"),
            ],
        )
    group = add(
        name="ModelInstanceGroup",
        field=[_field("count", 2, "int32"), _field("kind", 4, "enum:ModelInstanceGroup.Kind")],
    )
    group.enum_type.append(_enum("Kind", KINDS))
    add(name="ModelDynamicBatching")
    accelerators = "ModelOptimizationPolicy.ExecutionAccelerators"
    policy = add(name="ModelOptimizationPolicy", field=[_field("execution_accelerators", 4, accelerators)])
    policy.nested_type.add(
        name="ExecutionAccelerators",
        field=[_field("gpu_execution_accelerator", 1, f"{accelerators}.Accelerator", repeated=True)],
        nested_type=[descriptor_pb2.DescriptorProto(name="Accelerator", field=[_field("name", 1, "string")])],
    )
    add(
        name="ModelConfig",
        field=[
            _field("name", 1, "string"),
            _field("platform", 2, "string"),
            _field("max_batch_size", 4, "int32"),
            _field("input", 5, "ModelInput", repeated=True),
            _field("output", 6, "ModelOutput", repeated=True),
            _field("instance_group", 7, "ModelInstanceGroup", repeated=True),
            _field("dynamic_batching", 11, "ModelDynamicBatching"),
            _field("optimization", 12, "ModelOptimizationPolicy"),
        ],
    )
    return schema


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_schema())
try:
    _message_class = message_factory.GetMessageClass
except AttributeError:  # protobuf < 4.22, which onnx 1.16 still allows
    _message_class = message_factory.MessageFactory(_POOL).GetPrototype
ModelConfig: type[Message] = _message_class(_POOL.FindMessageTypeByName("inference.ModelConfig"))


def to_text(config: Message) -> str:
    """`config` in protobuf text format: fields in number order, two-space indents, UTF-8 strings,
    repeated numbers on one line (`dims: [-1, 8]`)."""
    return text_format.MessageToString(config, as_utf8=True, use_short_repeated_primitives=True)


def parse(text: str) -> Message:
    """A `ModelConfig` from its text format; raises `text_format.ParseError` on a syntax error or on a
    field this cut-down message does not declare."""
    return text_format.Parse(text, ModelConfig())


def difference(old: Message, new: Message, path: str = "") -> str | None:
    """Where `old` first differs from `new`, as `input[0].dims: [4], would be [6]`; None when equal."""
    if old == new:
        return None
    for field in old.DESCRIPTOR.fields:
        where = f"{path}.{field.name}" if path else field.name
        a, b = getattr(old, field.name), getattr(new, field.name)
        if field.message_type is not None and isinstance(a, Message):
            if old.HasField(field.name) != new.HasField(field.name):
                return f"{where}: {_presence(old, field.name)}, would be {_presence(new, field.name)}"
            found = difference(a, b, where)
        elif field.message_type is not None:
            found = next(
                (difference(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b)) if x != y), None
            )
            if found is None and len(a) != len(b):
                found = f"{where}: {len(a)} of them, would be {len(b)}"
        elif a != b:
            found = f"{where}: {_value_text(field, a)}, would be {_value_text(field, b)}"
        else:
            found = None
        if found is not None:
            return found
    raise AssertionError("unequal messages with no differing field")


def _presence(message: Message, name: str) -> str:
    return "set" if message.HasField(name) else "not set"


def _value_text(field, value) -> str:
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    if isinstance(value, (str, int)):
        return repr(value)
    return repr(list(value))
