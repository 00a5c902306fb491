"""Check written repositories against Triton's own schema and against the ONNX graph, independently of
lc_onnx.deploy: the schema is the `model_config.proto` that ships in tritonclient, the type names come
from tritonclient's numpy mapping."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
from google.protobuf import text_format

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'

# Small graphs in ONNX text: name -> (graph text, expected default max_batch_size).
GRAPHS = {
    "fp16_int64": (
        "g (float16[N,4] a, int64[N,2] b) => (float16[N,4] y, int64[N,2] z) { y = Relu(a) z = Neg(b) }",
        8,
    ),
    "static": ("g (float[1,4] x) => (float[1,4] y) { y = Relu(x) }", 0),
    "symbolic_inner": ("g (float[N,T,8] x) => (float[N,T,8] y) { y = Relu(x) }", 8),
    "batch_only_output": (
        "g (float[N,4] x) => (float[N] s) { ax = Constant <value = int64[1] {1}> () s = ReduceSum <keepdims=0> (x, ax) }",
        8,
    ),
    "static_scalar_output": ("g (float[4] x) => (float s) { s = ReduceSum <keepdims=0> (x) }", 0),
    "string_bool": (
        "g (string[N] t, bool[N,2] b) => (string[N] u, bool[N,2] c) { u = Identity(t) c = Not(b) }",
        8,
    ),
    "bf16": ("g (bfloat16[B,3] x) => (bfloat16[B,3] y) { y = Identity(x) }", 8),
    "unknown_leading_dim": ("g (float[?,4] x) => (float[?,4] y) { y = Relu(x) }", 8),
    "one_static_output": (
        "g (float[N,4] x) => (float[N,4] y, float[4] m) { y = Relu(x) m = ReduceMean <axes=[0], keepdims=0> (x) }",
        0,
    ),
}


_SCHEMA: ModuleType | None = None


def model_config_pb2() -> ModuleType:
    """tritonclient's generated `model_config_pb2`, loaded from its file.

    It lives in `tritonclient.grpc`, whose `__init__` needs the grpc extra; the message module itself
    only needs protobuf, so it is loaded on its own.
    """
    global _SCHEMA
    if _SCHEMA is None:
        spec = importlib.util.find_spec("tritonclient")
        assert spec is not None and spec.submodule_search_locations, "tritonclient is not installed"
        path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
        module_spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        _SCHEMA = module
    return _SCHEMA


def parse_config(path: Path):
    """`config.pbtxt` parsed as `inference.ModelConfig`; text_format raises on any unknown field."""
    return parse_config_text(Path(path).read_text())


def parse_config_text(text: str):
    return text_format.Parse(text, model_config_pb2().ModelConfig())


def triton_type(elem_type: int) -> str:
    """The Triton config type of an ONNX element type, by way of numpy and tritonclient's mapping."""
    from tritonclient.utils import np_to_triton_dtype

    name = np_to_triton_dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    return "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}"


def graph_dims(value: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


def assert_config_matches_graph(config, model: onnx.ModelProto) -> None:
    """Every graph input and output appears, in order, with its name, type and (batch-less) dims."""
    schema = model_config_pb2()
    assert config.platform == "onnxruntime_onnx"
    batched = config.max_batch_size > 0
    initializers = {t.name for t in model.graph.initializer}
    for declared, values in (
        (config.input, [v for v in model.graph.input if v.name not in initializers]),
        (config.output, list(model.graph.output)),
    ):
        assert [t.name for t in declared] == [v.name for v in values]
        for tensor, value in zip(declared, values):
            assert schema.DataType.Name(tensor.data_type) == triton_type(value.type.tensor_type.elem_type)
            dims = graph_dims(value)
            if batched:
                assert dims and dims[0] == -1, f"{value.name}: batched config on a non-batch dim"
                dims = dims[1:]
            if dims:
                assert list(tensor.dims) == dims
                assert not tensor.HasField("reshape")
            else:
                assert list(tensor.dims) == [1]
                assert list(tensor.reshape.shape) == []


def run_ort(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)


def hidden_entries(root: Path) -> list[Path]:
    """Leftover temporary files or directories (the writer's are all dot-names)."""
    return [p for p in Path(root).rglob(".*")]
