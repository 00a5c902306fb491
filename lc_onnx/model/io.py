"""Reading and writing models: the one place that touches model files.

Models are loaded *without* their external data: tensors stored outside the `.onnx` file stay on disk and
are read on demand (`read_tensor`, memory-mapped), so a 2 GB model does not cost 2 GB to open. Every
external-data location is checked to stay inside the model's directory (a location like `../../etc/x`
is a path traversal and is refused). Saving is atomic (temporary files in the destination directory,
then `os.replace`) and streams external tensors from their source files to the new data file.

Everything that is the input's fault raises `UserError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from lc_onnx.errors import UserError, one_line
from lc_onnx.model import files, wire
from lc_onnx.model.protos import is_default_domain

# Tensors at least this large go to the external data file when a model is saved with external data.
EXTERNAL_MIN_BYTES = 1024
# Above this a model cannot be one protobuf (2 GiB hard limit); keep a margin for the graph itself.
PROTO_LIMIT_BYTES = 2**31 - 64 * 2**20
_COPY_CHUNK = 64 * 2**20


@dataclass
class LoadedModel:
    """A model proto whose external tensors (if any) still live in files under `base_dir`.

    `source_external` says whether the model on disk used external data files; large inline weights of a
    self-contained `.onnx` are also left on disk (as references into the `.onnx` itself, see `wire`), but
    such a model is written back self-contained.
    """

    proto: onnx.ModelProto
    base_dir: Path | None
    path: Path | None = None
    source_external: bool = False

    @property
    def has_external_data(self) -> bool:
        return any(_is_external(t) for t in iter_tensors(self.proto))


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load a model with all its tensor data in memory (for small models and callers that need it)."""
    loaded = load(path)
    if loaded.has_external_data:
        for tensor in iter_tensors(loaded.proto):
            if _is_external(tensor):
                _inline(tensor, loaded.base_dir)
    return loaded.proto


def load(path: str | os.PathLike) -> LoadedModel:
    """Load `path` leaving external data on disk; validate that every external tensor is readable."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file")
    if p.is_dir():
        raise UserError(f"{p}: is a directory, expected an .onnx file")
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise UserError(f"{p}: cannot read ({exc.strerror})") from None
    if size == 0:
        raise UserError(f"{p}: empty file, not an ONNX model")
    proto = onnx.ModelProto()
    try:
        data, moved = wire.read_model_bytes(p)
        proto.ParseFromString(data)
    except PermissionError:
        raise UserError(f"{p}: permission denied") from None
    except OSError as exc:
        raise UserError(f"{p}: cannot read ({exc.strerror})") from None
    except Exception as exc:  # wire.WireError, protobuf's DecodeError
        raise UserError(
            f"{p}: not a readable ONNX model ({type(exc).__name__}: {one_line(exc, 200)})"
        ) from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise UserError(f"{p}: not an ONNX model (no graph found)")
    # References into the .onnx itself come from `wire`; any other location is a real external data file.
    source_external = any(
        _is_external(t) and not (moved and _external_info(t).get("location") == p.name)
        for t in iter_tensors(proto)
    )
    loaded = LoadedModel(proto, p.resolve().parent, p, source_external)
    for tensor in iter_tensors(proto):
        if _is_external(tensor):
            external_path(tensor, loaded.base_dir)
    return loaded


def from_proto(model: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> LoadedModel:
    """Wrap an in-memory proto; external tensors (if any) resolve against `base_dir`."""
    loaded = LoadedModel(model, Path(base_dir).resolve() if base_dir is not None else None)
    loaded.source_external = loaded.has_external_data
    for tensor in iter_tensors(model):
        if _is_external(tensor):
            if loaded.base_dir is None:
                raise UserError(
                    f"tensor {tensor.name!r} uses external data but the model was given without its "
                    "directory; pass the model path instead"
                )
            external_path(tensor, loaded.base_dir)
    return loaded


def as_loaded(model: str | os.PathLike | onnx.ModelProto | LoadedModel) -> LoadedModel:
    """`model` as a `LoadedModel`: a path is loaded (weights left on disk), a proto wrapped as it is."""
    if isinstance(model, LoadedModel):
        return model
    return from_proto(model) if isinstance(model, onnx.ModelProto) else load(model)


def add_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> list[str]:
    """Declare the tensors `names` graph outputs of `proto` too, in place (their types are left for
    onnxruntime to infer); returns those that were not outputs yet."""
    declared = {o.name for o in proto.graph.output}
    added = [name for name in dict.fromkeys(names) if name not in declared]
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in added)
    return added


def with_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `proto` whose graph also outputs the tensors `names` (see `add_outputs`). External
    tensors stay references, so the copy is small."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    add_outputs(out, names)
    return out


def keep_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> None:
    """Make the tensors `names` the graph's only outputs, in place, and drop the nodes and initializers
    that do not lead to them (so onnxruntime computes, and loads, only what they need)."""
    graph = proto.graph
    declared = {o.name: o for o in graph.output}
    needed = set(names)
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(_reads(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    outputs = [declared.get(name) or onnx.ValueInfoProto(name=name) for name in dict.fromkeys(names)]
    del graph.output[:]
    graph.output.extend(outputs)


def start_at(proto: onnx.ModelProto, sources: Mapping[str, int]) -> bool:
    """Make the tensors `sources` (name -> element type) graph inputs of `proto`, in place, and drop the
    nodes and initializers the outputs then no longer need: the graph computes only what lies after them.
    Returns False, leaving `proto` unchanged, when one is a graph input already or a node it keeps
    writes one of them."""
    graph = proto.graph
    if any(v.name in sources for v in graph.input):
        return False
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(name for name in _reads(node) if name not in sources)
    if any(out in sources for node in kept for out in node.output):
        return False
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    graph.input.extend(onnx.helper.make_tensor_value_info(name, elem, None) for name, elem in sources.items())
    return True


def _reads(node: onnx.NodeProto) -> Iterator[str]:
    """The tensors a node reads, those its subgraphs read from the outer scope included."""
    yield from node.input
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for inner in sub.node:
                yield from _reads(inner)


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers and tensor attributes, subgraphs and functions included."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for g in attr.graphs:
            yield from _graph_tensors(g)


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without large tensor data: dims and types only (for shape inference and counting).

    Main-graph initializers and `Constant` values of at least `EXTERNAL_MIN_BYTES` (or already external)
    become empty stubs marked as external data (shape inference reads only their dims); small ones, such
    as shape constants, keep their values. This is the one data-free copy lc-onnx makes.
    """
    out = onnx.ModelProto()
    graph = model.graph
    big = {t.name for t in graph.initializer if _is_big(t)}
    constants = [i for i, node in enumerate(graph.node) if _big_constant_value(node) is not None]
    if not big and not constants:
        out.CopyFrom(model)
        return out
    keep = onnx.GraphProto()
    for name in ("input", "output", "value_info", "sparse_initializer", "quantization_annotation"):
        getattr(keep, name).extend(getattr(graph, name))
    keep.name, keep.doc_string = graph.name, graph.doc_string
    keep.initializer.extend(_stub(t) if t.name in big else t for t in graph.initializer)
    keep.node.extend(graph.node)
    for i in constants:
        _big_constant_value(keep.node[i]).CopyFrom(_stub(_big_constant_value(graph.node[i])))
    for descriptor, value in model.ListFields():
        if descriptor.name == "graph":
            continue
        if hasattr(value, "extend"):  # repeated field
            getattr(out, descriptor.name).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(out, descriptor.name).CopyFrom(value)
        else:
            setattr(out, descriptor.name, value)
    out.graph.CopyFrom(keep)
    return out


def _is_big(tensor: onnx.TensorProto) -> bool:
    return _is_external(tensor) or len(tensor.raw_data) >= EXTERNAL_MIN_BYTES


def _big_constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or not is_default_domain(node.domain):
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.HasField("t") and _is_big(attr.t):
            return attr.t
    return None


def _stub(tensor: onnx.TensorProto) -> onnx.TensorProto:
    stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    stub.data_location = onnx.TensorProto.EXTERNAL
    entry = stub.external_data.add()
    entry.key, entry.value = "location", "stripped-by-lc-onnx"
    return stub


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def external_path(tensor: onnx.TensorProto, base_dir: Path | None) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor, refusing locations outside `base_dir`."""
    info = _external_info(tensor)
    location = info.get("location", "")
    if not location:
        raise UserError(f"tensor {tensor.name!r}: external data without a location")
    if base_dir is None:
        raise UserError(f"tensor {tensor.name!r}: external data {location!r} but no model directory")
    if os.path.isabs(location) or ".." in Path(location).parts:
        raise UserError(
            f"tensor {tensor.name!r}: external data location {location!r} escapes the model's directory"
        )
    target = (base_dir / location).resolve()
    if os.path.commonpath([str(target), str(base_dir.resolve())]) != str(base_dir.resolve()):
        raise UserError(
            f"tensor {tensor.name!r}: external data location {location!r} escapes the model's directory"
        )
    if not target.is_file():
        raise UserError(
            f"tensor {tensor.name!r}: external data file {location!r} not found next to the model"
        )
    offset = int(info.get("offset", 0) or 0)
    nbytes = _expected_nbytes(tensor)
    length = int(info["length"]) if "length" in info else (nbytes if nbytes is not None else -1)
    size = target.stat().st_size
    if length < 0:
        length = size - offset
    if offset < 0 or offset + length > size:
        raise UserError(
            f"tensor {tensor.name!r}: external data {location!r} is truncated "
            f"(needs bytes {offset}..{offset + length}, file has {size})"
        )
    return target, offset, length


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:
        return None
    if tensor.data_type in (onnx.TensorProto.STRING,):
        return None
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def read_tensor(tensor: onnx.TensorProto, base_dir: Path | None) -> np.ndarray:
    """The tensor's values as numpy; external data is memory-mapped, not copied."""
    if isinstance(tensor, onnx.SparseTensorProto):
        return _dense(tensor, base_dir)
    try:
        if not _is_external(tensor):
            return numpy_helper.to_array(tensor)
        target, offset, length = external_path(tensor, base_dir)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        shape = tuple(tensor.dims)
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            return np.zeros(shape, dtype=dtype)
        data = np.memmap(target, dtype=np.uint8, mode="r", offset=offset, shape=(length,))
        # ONNX stores little-endian; memmap views stay lazy until the values are used.
        return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"), count=count).reshape(shape)
    except (ValueError, TypeError, KeyError) as exc:  # data of the wrong size for its dims, unknown dtype
        raise UserError(
            f"tensor {tensor.name!r}: data does not match its type and shape ({one_line(exc, 200)})"
        ) from None


def _dense(sparse: onnx.SparseTensorProto, base_dir: Path | None) -> np.ndarray:
    """A sparse tensor as a dense array of its values' dtype (indices: `[NNZ]` linear or `[NNZ, rank]`)."""
    values = read_tensor(sparse.values, base_dir)
    indices = read_tensor(sparse.indices, base_dir).astype(np.int64)
    dims = tuple(sparse.dims)
    try:
        flat = indices if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), dims)
        dense = np.zeros(int(np.prod(dims, dtype=np.int64)), dtype=values.dtype)
        dense[flat] = values.reshape(-1)
    except (ValueError, IndexError) as exc:
        raise UserError(
            f"sparse tensor {sparse.values.name!r}: indices do not fit its shape ({one_line(exc, 200)})"
        ) from None
    return dense.reshape(dims)


def _inline(tensor: onnx.TensorProto, base_dir: Path | None) -> None:
    target, offset, length = external_path(tensor, base_dir)
    with open(target, "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    del tensor.external_data[:]
    tensor.ClearField("data_location")  # proto2: an explicit DEFAULT would be serialized
    tensor.raw_data = raw


def data_file_name(path: Path) -> str:
    """Name of the external data file written beside `path`."""
    return path.name + ".data"


def save(loaded: LoadedModel, path: str | os.PathLike, *, external: bool | None = None) -> Path:
    """Write `loaded.proto` to `path` atomically; with external data in `path.data` when `external`.

    `external=None` decides: external when the source already used external data or the tensors would not
    fit one protobuf. Afterwards `loaded.proto` describes the written file (its external tensors point at
    the new data file, relative to `path`'s directory).
    """
    out = Path(path)
    parent = files.writable_parent(out)
    if external is None:
        external = loaded.source_external or _data_bytes(loaded.proto) > PROTO_LIMIT_BYTES
    model = loaded.proto
    data_name = data_file_name(out)
    # The data file is published first and only once the model serialized: a failure leaves neither.
    with files.atomic_path(parent / data_name) if external else contextlib.nullcontext() as tmp_data:
        if external:
            try:
                with open(tmp_data, "wb") as data:
                    _write_external(model, loaded.base_dir, data, data_name)
            except OSError as exc:
                raise UserError(f"{out}: cannot write ({exc.strerror or exc})") from None
        elif loaded.has_external_data:
            for tensor in iter_tensors(model):
                if _is_external(tensor):
                    _inline(tensor, loaded.base_dir)
        payload = model.SerializeToString()
    with files.atomic_open(out, "wb") as f:
        f.write(payload)
    return out


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external: bool | None = None) -> Path:
    """Atomically write an in-memory model (external data beside it when too large for one protobuf).

    Only tensors stored as `raw_data` (what exporters write) move to the data file. `model` is not changed.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return save(from_proto(copy), path, external=external)


def _data_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data, inline or external: what the model would weigh as one protobuf."""
    total = 0
    for tensor in iter_tensors(model):
        if _is_external(tensor):
            total += int(_external_info(tensor).get("length", 0) or 0) or (_expected_nbytes(tensor) or 0)
        else:
            total += len(tensor.raw_data)
    return total + model.ByteSize()


def _write_external(model: onnx.ModelProto, base_dir: Path | None, data, data_name: str) -> None:
    offset = 0
    for tensor in iter_tensors(model):
        if _is_external(tensor):
            source, start, length = external_path(tensor, base_dir)
            chunks = _file_chunks(source, start, length)
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
            chunks = iter((tensor.raw_data,))
            length = len(tensor.raw_data)
        else:
            continue
        pad = (-offset) % 4096  # page alignment lets onnxruntime memory-map the weights
        if pad:
            data.write(b"\0" * pad)
            offset += pad
        for chunk in chunks:
            data.write(chunk)
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        offset += length


def _file_chunks(path: Path, start: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        remaining = length
        while remaining > 0:
            chunk = f.read(min(_COPY_CHUNK, remaining))
            if not chunk:
                raise UserError(f"{path}: external data ended early")
            remaining -= len(chunk)
            yield chunk
