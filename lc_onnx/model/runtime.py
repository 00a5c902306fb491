"""onnxruntime access: the one session factory, runs with one-line failures, and input feeds.

Every onnxruntime session lc-onnx opens comes from `session`: the provider (checked to be the one that
actually runs), the graph optimisation level, threads, profiling, and where external data is read from
are decided here and nowhere else. A model is given as

- a path: onnxruntime reads the file and its external data (relative to the file) itself;
- serialized bytes: self-contained models only;
- a `ModelProto` whose large tensors still live on disk (`io.load` leaves them there, and candidate
  graphs built from such a model keep the references): the external initializers are read from
  `base_dir`, memory-mapped, and handed to onnxruntime as `OrtValue`s, so nothing is copied to a
  temporary file.

onnxruntime comes from the `cpu` or `gpu` extra (never both: they install the same module).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
from onnx import numpy_helper

from lc_onnx.errors import UserError, one_line
from lc_onnx.model import exercise as exercise_mod
from lc_onnx.model import io
from lc_onnx.model.protos import dims_of

DEFAULT_DYNAMIC_DIM = 2
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

ModelSource = str | os.PathLike | bytes | onnx.ModelProto


def import_ort() -> ModuleType:
    """The onnxruntime module, or a `UserError` that says which extra to install."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(
            "onnxruntime is not installed: pip install 'lc-onnx[cpu]' (or 'lc-onnx[gpu]' on a CUDA machine)"
        ) from None
    return onnxruntime


def check_provider(provider: str) -> str:
    """The onnxruntime name of `provider` (`cpu` or `cuda`), or a one-line `UserError` when this
    onnxruntime build does not offer it."""
    if provider not in PROVIDERS:
        raise UserError(
            f"unknown {{provider}} {provider!r}; choose from {', '.join(PROVIDERS)}", params=["provider"]
        )
    ort = import_ort()
    name = PROVIDERS[provider]
    available = ort.get_available_providers()
    if name not in available:
        raise UserError(
            f"{name} is not available in this onnxruntime {ort.__version__} build "
            f"(available: {', '.join(available)}); "
            "pip install 'lc-onnx[gpu]' (onnxruntime-gpu, with a matching CUDA) in place of onnxruntime"
        )
    return name


def session(
    model: ModelSource,
    *,
    base_dir: str | os.PathLike | None = None,
    provider: str = "cpu",
    threads: int | None = None,
    optimization: str = "basic",
    profile_prefix: str | None = None,
    name: str | None = None,
):
    """An `InferenceSession` for `model` (a path, serialized bytes, or a `ModelProto`; see the module
    docstring) running on exactly `provider`.

    Args:
        base_dir: where a `ModelProto`'s external tensors live.
        provider: `cpu` or `cuda`; a session that falls back to another provider is refused.
        threads: intra-op threads (with one inter-op thread); None leaves onnxruntime's default.
        optimization: onnxruntime's graph optimisation level, one of `OPTIMIZATION_LEVELS`.
        profile_prefix: turn on onnxruntime's profiler, writing files with this prefix.
        name: how errors call the model (default: the file name, or "the model").

    Raises:
        UserError: onnxruntime or the provider is missing, or onnxruntime cannot load the model.
    """
    ort = import_ort()
    provider_name = check_provider(provider)
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    options.log_severity_level = 3
    keep: list = []
    if isinstance(model, onnx.ModelProto):
        source = _proto_source(ort, model, base_dir, options, keep)
        label = name or "the model"
    elif isinstance(model, bytes):
        source, label = model, name or "the model"
    else:
        source = str(model)
        label = name or Path(source).name
    try:
        result = ort.InferenceSession(source, sess_options=options, providers=[provider_name])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise UserError(f"onnxruntime cannot load {label}: {one_line(exc, 300)}") from None
    if result.get_providers()[0] != provider_name:
        # The CUDA provider falls back to CPU silently when its libraries fail to load.
        raise UserError(
            f"{provider_name} failed to initialise for {label} (runs on {result.get_providers()})"
        )
    result._lc_keep = keep  # the OrtValues of external initializers must outlive the session
    return result


def _proto_source(ort, model: onnx.ModelProto, base_dir, options, keep: list) -> bytes:
    """Serialized `model`; external initializers go to `options` as memory-mapped `OrtValue`s, and the
    few other external tensors (`Constant` values, tensors in subgraphs) are read into a copy."""
    base = Path(base_dir) if base_dir is not None else None
    names = []
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names.append(tensor.name)
            keep.append(ort.OrtValue.ortvalue_from_numpy(np.asarray(io.read_tensor(tensor, base))))
    if names:
        options.add_external_initializers(names, keep)
    external = sum(t.data_location == onnx.TensorProto.EXTERNAL for t in io.iter_tensors(model))
    if external == len(names):
        return model.SerializeToString()
    inlined = onnx.ModelProto()
    inlined.CopyFrom(model)  # external initializers are stubs: the copy holds no weights
    given = set(names)  # by name: protobuf hands out a new wrapper object per access
    for tensor in io.iter_tensors(inlined):
        if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.name not in given:
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(io.read_tensor(tensor, base)), tensor.name))
    return inlined.SerializeToString()


def run(
    sess,
    feed: Mapping[str, np.ndarray],
    names: Sequence[str] | None = None,
    *,
    on: str = "its inputs",
    what: str = "the model",
    error: type[UserError] = UserError,
) -> dict[str, np.ndarray]:
    """The outputs `names` (default: all) of one run as `{name: array}`; a failed run raises `error`
    with one line: "onnxruntime cannot run {what} on {on}: ..."."""
    names = list(names) if names is not None else [o.name for o in sess.get_outputs()]
    try:
        return dict(zip(names, sess.run(names, dict(feed))))
    except Exception as exc:  # onnxruntime's own exception types
        raise error(f"onnxruntime cannot run {what} on {on}: {one_line(exc)}") from None


def input_shapes(
    model: onnx.ModelProto, overrides: Mapping[str, Sequence[int]] | None = None, *, exercise: bool = False
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for the graph inputs: static dims kept, dynamic ones (symbolic, missing, or
    written as a negative `dim_value`, which onnxruntime also treats as dynamic) set small, or, with
    `exercise`, as real inputs have them (see `exercise`); `overrides` win."""
    overrides = dict(overrides or {})
    initializers = {t.name for t in model.graph.initializer}
    side = exercise_mod.image_side(model) if exercise else 0
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.name in overrides:
            shapes[value.name] = tuple(int(d) for d in overrides.pop(value.name))
            continue
        dims = dims_of(value)
        if dims is None:
            raise UserError(
                f"input {value.name!r} has no known rank; give its shape in {{input_shapes}}",
                params=["input_shapes"],
            )
        if exercise:
            shapes[value.name] = exercise_mod.dims(value, side)
        else:
            shapes[value.name] = tuple(DEFAULT_DYNAMIC_DIM if d is None else d for d in dims)
    if overrides:
        names = ", ".join(sorted(overrides))
        raise UserError(f"{{input_shapes}} names unknown input(s): {names}", params=["input_shapes"])
    return shapes


def random_feeds(
    model: onnx.ModelProto,
    shapes: Mapping[str, Sequence[int]],
    *,
    seed: int = 0,
    index_rows: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Random inputs of the model's graph-input types at `shapes` (see `random_inputs`)."""
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    dtypes = {}
    for name in shapes:
        if types[name] == 0:
            raise UserError(f"input {name!r} is not a tensor; lc-onnx verifies tensor inputs only")
        dtypes[name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(types[name]))
    return random_inputs(dtypes, shapes, seed=seed, index_rows=index_rows)


def random_inputs(
    dtypes: Mapping[str, np.dtype],
    shapes: Mapping[str, Sequence[int]],
    *,
    seed: int = 0,
    index_rows: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Standard normal floats; integers that index a table (`index_rows`: input -> rows) drawn from its
    rows; inputs named like an attention mask ones (every token attended, as a tokenizer gives); other
    integers and booleans zero (safe as indices: token 0)."""
    rng = np.random.default_rng(seed)
    index_rows = index_rows or {}
    feeds = {}
    for name, shape in shapes.items():
        dtype = dtypes[name]
        if np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16":
            feeds[name] = rng.standard_normal(tuple(shape)).astype(dtype)
        elif "mask" in name.lower():
            feeds[name] = np.ones(tuple(shape), dtype=dtype)
        elif name in index_rows and np.issubdtype(dtype, np.integer):
            feeds[name] = rng.integers(0, index_rows[name], size=tuple(shape)).astype(dtype)
        else:
            feeds[name] = np.zeros(tuple(shape), dtype=dtype)
    return feeds
