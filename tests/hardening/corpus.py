"""The bad-input corpus: one small builder per kind of input a user may hand to `lc-onnx fuse`.

Each builder writes its model (and whatever else the case needs) into a fresh directory and returns an
`Invocation`: the model path and the extra command-line arguments. `ERRORS` must end in a one-line error,
`OUTPUTS` in a correct model with the given number of collapses.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.hardening.graphs import MIN_IR, mlp


@dataclass
class Invocation:
    model: Path
    args: list[str] = field(default_factory=list)
    output: Path | None = None  # None: `-o <dir>/out/fused.onnx` beside the model


def save(model: onnx.ModelProto, d: Path, name: str = "m.onnx") -> Path:
    path = d / name
    path.write_bytes(model.SerializeToString())
    return path


def raw(data: bytes) -> Callable[[Path], Invocation]:
    def build(d: Path) -> Invocation:
        path = d / "m.onnx"
        path.write_bytes(data)
        return Invocation(path)

    return build


def with_model(model_fn: Callable[[], onnx.ModelProto], *args: str) -> Callable[[Path], Invocation]:
    return lambda d: Invocation(save(model_fn(), d), list(args))


def external(d: Path, location: str | None = None, data_dir: Path | None = None) -> Path:
    """`m.onnx` with all weights in `m.onnx.data` (in `data_dir`, default `d`) and `location` written in
    the model (default the real relative name)."""
    model = mlp((16, 32, 16))
    data_dir = data_dir or d
    data_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(data_dir / "m.onnx"), save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)  # fmt: skip
    model = onnx.load(str(data_dir / "m.onnx"), load_external_data=False)
    if location is not None:
        for t in model.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = location
    return save(model, d)


# --- models that are wrong in one way ---------------------------------------------------------------


def cycle_to_output() -> onnx.ModelProto:
    """A collapsible site, and a cycle that the graph output depends on."""
    m = mlp()
    m.graph.node[-1].output[0] = "y0"
    m.graph.node.extend([
        helper.make_node("Relu", ["c2"], ["c1"], name="cyc1"),
        helper.make_node("Add", ["c1", "y0"], ["c2"], name="cyc2"),
        helper.make_node("Identity", ["c2"], ["y"], name="out"),
    ])  # fmt: skip
    return m


def cycle_in_site() -> onnx.ModelProto:
    m = mlp((4, 8, 8, 4), act="Identity")
    m.graph.node[1].input[0] = "fc1_act"
    return m


def unknown_domain_after_site() -> onnx.ModelProto:
    m = mlp()
    m.graph.node[-1].output[0] = "y0"
    m.graph.node.append(helper.make_node("Weird", ["y0"], ["y"], name="weird", domain="com.example"))
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    return m


def unknown_domain_in_site() -> onnx.ModelProto:
    m = mlp()
    act = m.graph.node[1]
    act.op_type, act.domain = "Weird", "com.example"
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    return m


def bad_tensor_size() -> onnx.ModelProto:
    m = mlp()
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:-4]
    return m


def no_opset() -> onnx.ModelProto:
    m = mlp()
    del m.opset_import[:]
    return m


def future(field_name: str) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        m = mlp()
        if field_name == "ir":
            m.ir_version = 99
        else:
            m.opset_import[0].version = 99
        return m

    return build


def dynamic_rank() -> onnx.ModelProto:
    m = mlp()
    m.graph.input[0].type.tensor_type.ClearField("shape")
    return m


# --- odd but valid models ---------------------------------------------------------------------------


def graph_output_between(tensor: str) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        m = mlp()
        m.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, ["N", 8]))
        return m

    return build


def shared_weights() -> onnx.ModelProto:
    m = mlp((4, 4, 4, 4), act="Identity")
    for node in m.graph.node:
        if node.op_type == "Gemm":
            node.input[1] = "fc0.weight"
    m.graph.initializer.remove(next(t for t in m.graph.initializer if t.name == "fc1.weight"))
    m.graph.initializer.remove(next(t for t in m.graph.initializer if t.name == "fc2.weight"))
    return m


def weight_input(with_initializer: bool) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        m = mlp()
        w = m.graph.initializer[0]
        m.graph.input.append(helper.make_tensor_value_info(w.name, w.data_type, list(w.dims)))
        if not with_initializer:
            m.graph.initializer.remove(w)
        return m

    return build


def integer_graph(elem_type: int) -> Callable[[], onnx.ModelProto]:
    return lambda: mlp(style="matmul", elem_type=elem_type, act=None)


def bool_graph() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Not", ["b"], ["t"]), helper.make_node("And", ["t", "b"], ["u"])],
        "bools",
        [helper.make_tensor_value_info("b", TensorProto.BOOL, ["N", 3])],
        [helper.make_tensor_value_info("u", TensorProto.BOOL, ["N", 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def bf16_weights_cast_to_float() -> onnx.ModelProto:
    """bf16 initializers, each `Cast` to float before use (how bf16 checkpoints are often exported)."""
    m = mlp(elem_type=TensorProto.BFLOAT16)
    for v in (*m.graph.input, *m.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT
    casts = [
        helper.make_node("Cast", [t.name], [t.name + "_f"], to=TensorProto.FLOAT) for t in m.graph.initializer
    ]
    inits = {t.name for t in m.graph.initializer}
    for node in m.graph.node:
        node.input[:] = [name + "_f" if name in inits else name for name in node.input]
    nodes = casts + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


ODD = "fc/ü é\"'\n:;*?<>|\\ 0"


def odd_names() -> onnx.ModelProto:
    m = mlp(prefix=ODD)
    for v in (*m.graph.input, *m.graph.output):
        old = v.name
        v.name = ODD + "·" + old
        for node in m.graph.node:
            node.input[:] = [v.name if n == old else n for n in node.input]
            node.output[:] = [v.name if n == old else n for n in node.output]
    return m


def _branch(name: str, nodes, inits, out: str) -> onnx.GraphProto:
    return helper.make_graph(
        nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits
    )


def if_with_site_inside() -> onnx.ModelProto:
    """The whole MLP lives in the `then` branch (reads `x` from the outer scope)."""
    body = mlp().graph
    then_g = _branch("then", list(body.node), list(body.initializer), "y")
    else_g = _branch("else", [helper.make_node("Neg", ["x"], ["y_else"])], [], "y_else")
    cond = numpy_helper.from_array(np.array(True), "cond")
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g, name="if")],
        "if_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])],
        [cond],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def if_reading_hidden() -> onnx.ModelProto:
    """A collapsible site whose hidden tensor is also read inside an If branch (an invisible consumer)."""
    m = mlp()
    then_g = _branch("then", [helper.make_node("Identity", ["fc0_act"], ["z"])], [], "z")
    else_g = _branch("else", [helper.make_node("Neg", ["fc0_act"], ["z2"])], [], "z2")
    m.graph.node.append(helper.make_node("If", ["cond"], ["side"], then_branch=then_g, else_branch=else_g))
    m.graph.initializer.append(numpy_helper.from_array(np.array(False), "cond"))
    m.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, ["N", 8]))
    return m


def if_after_site() -> onnx.ModelProto:
    m = mlp()
    m.graph.node[-1].output[0] = "y0"
    then_g = _branch("then", [helper.make_node("Identity", ["y0"], ["z"])], [], "z")
    else_g = _branch("else", [helper.make_node("Neg", ["y0"], ["z2"])], [], "z2")
    m.graph.node.append(helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g))
    m.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    return m


def loop_with_site_inside() -> onnx.ModelProto:
    inner = mlp()
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         *[_rename(n, {"x": "v", "y": "v_out"}) for n in inner.graph.node]],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", 4])],
        list(inner.graph.initializer),
    )  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Loop", ["M", "cond", "x"], ["y"], body=body, name="loop")],
        "loop_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [
            numpy_helper.from_array(np.array(3, np.int64), "M"),
            numpy_helper.from_array(np.array(True), "cond"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def scan_with_site_inside() -> onnx.ModelProto:
    """Scan over `x [T, 2, 4]`: state `s [2, 4]` becomes `s + mlp(x_t)`."""
    inner = mlp()
    body = helper.make_graph(
        [*[_rename(n, {"x": "x_t", "y": "h"}) for n in inner.graph.node],
         helper.make_node("Add", ["s", "h"], ["s_out"]),
         helper.make_node("Identity", ["s_out"], ["scan_out"])],
        "body",
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("scan_out", TensorProto.FLOAT, [2, 4])],
        list(inner.graph.initializer),
    )  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Scan", ["s0", "x"], ["s_final", "ys"], body=body, num_scan_inputs=1, name="scan")],
        "scan_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2, 4])],
        [helper.make_tensor_value_info("s_final", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("ys", TensorProto.FLOAT, [3, 2, 4])],
        [numpy_helper.from_array(np.zeros((2, 4), np.float32), "s0")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def local_function() -> onnx.ModelProto:
    """A model-local function holding its own Gemm-free MatMul chain, called before a collapsible site."""
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32) * 2, "w")
    function = helper.make_function(
        "local", "Double",
        ["a"], ["b"],
        [helper.make_node("Constant", [], ["w"], value=w),
         helper.make_node("MatMul", ["a", "w"], ["h"]),
         helper.make_node("Identity", ["h"], ["h2"]),
         helper.make_node("MatMul", ["h2", "w"], ["b"])],
        opset_imports=[helper.make_opsetid("", 17)],
    )  # fmt: skip
    m = mlp()
    m.graph.node.insert(0, helper.make_node("Double", ["x"], ["x2"], domain="local", name="double"))
    m.graph.node[1].input[0] = "x2"
    m.functions.append(function)
    m.opset_import.append(helper.make_opsetid("local", 1))
    return m


def sparse(where: str) -> Callable[[], onnx.ModelProto]:
    """A `sparse_initializer`: added to the output after the site ("after"), or as the site's first weight."""

    def build() -> onnx.ModelProto:
        m = mlp()
        if where == "after":
            values, indices, dims = np.array([1.5, -2.0], np.float32), np.array([0, 2], np.int64), [4]
            m.graph.node[-1].output[0] = "y0"
            m.graph.node.append(helper.make_node("Add", ["y0", "s"], ["y"], name="add_sparse"))
            name = "s"
        else:
            w = m.graph.initializer[0]
            dense = numpy_helper.to_array(w).copy()
            dense[:, ::2] = 0
            indices = np.argwhere(dense)  # [NNZ, rank] coordinates
            values, dims, name = dense[dense != 0], list(dense.shape), w.name
            m.graph.initializer.remove(w)
        m.graph.sparse_initializer.append(
            helper.make_sparse_tensor(
                numpy_helper.from_array(values, name), numpy_helper.from_array(indices, name + ".idx"), dims
            )
        )
        return m

    return build


def _rename(node: onnx.NodeProto, names: dict[str, str]) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.input[:] = [names.get(n, n) for n in copy.input]
    copy.output[:] = [names.get(n, n) for n in copy.output]
    return copy


# --- the table --------------------------------------------------------------------------------------


def _output_is(target: Callable[[Path, Path], Path]) -> Callable[[Path], Invocation]:
    def build(d: Path) -> Invocation:
        model = save(mlp(), d)
        return Invocation(model, output=target(d, model))

    return build


def _symlink_to_input(d: Path, model: Path) -> Path:
    (d / "link.onnx").symlink_to(model)
    return d / "link.onnx"


def _hardlink_to_input(d: Path, model: Path) -> Path:
    os.link(model, d / "hard.onnx")
    return d / "hard.onnx"


def _file_as_dir(d: Path, model: Path) -> Path:
    (d / "plain").write_text("a file")
    return d / "plain" / "out.onnx"


def _existing_dir(d: Path, model: Path) -> Path:
    (d / "taken.onnx").mkdir()
    return d / "taken.onnx"


def _escape_symlink(d: Path) -> Invocation:
    outside = d / "outside"
    external(outside, data_dir=outside)
    inside = d / "model"
    inside.mkdir()
    (inside / "m.onnx.data").symlink_to(outside / "m.onnx.data")
    return Invocation(external(inside, location="m.onnx.data", data_dir=d / "scratch"))


def _escape_location(d: Path) -> Invocation:
    inside = d / "model"
    inside.mkdir()
    external(d, data_dir=d)
    return Invocation(external(inside, location="../m.onnx.data", data_dir=d / "scratch"))


def _escape_absolute(d: Path) -> Invocation:
    external(d / "abs", data_dir=d / "abs")
    inside = d / "model"
    inside.mkdir()
    return Invocation(external(inside, location=str(d / "abs" / "m.onnx.data"), data_dir=d / "scratch"))


def _missing_data(d: Path) -> Invocation:
    path = external(d)
    (d / "m.onnx.data").unlink()
    return Invocation(path)


def _truncated_data(d: Path) -> Invocation:
    path = external(d)
    data = d / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    return Invocation(path)


def _dir_input(d: Path) -> Invocation:
    (d / "m.onnx").mkdir()
    return Invocation(d / "m.onnx")


# (id, builder, exit code): each must fail with one line on stderr and leave everything as it was.
ERRORS: list[tuple[str, Callable[[Path], Invocation], int, str]] = [
    ("non_onnx_bytes", raw(b"this is not an onnx model\n"), 2, "not a readable ONNX model"),
    ("binary_garbage", raw(bytes(range(256)) * 8), 2, "not a readable ONNX model"),
    ("empty_file", raw(b""), 2, "empty file"),
    ("truncated_protobuf", raw(mlp().SerializeToString()[:60]), 2, "not a readable ONNX model"),
    (
        "protobuf_not_a_model",
        raw(numpy_helper.from_array(np.ones((3, 3), np.float32)).SerializeToString()),
        2,
        "not an ONNX model",
    ),
    ("directory", _dir_input, 2, "is a directory"),
    ("missing_path", lambda d: Invocation(d / "nope.onnx"), 2, "no such file"),
    ("output_dir_unwritable", _output_is(lambda d, m: Path("/proc/lc-onnx-out.onnx")), 2, "/proc"),
    (
        "output_dir_missing",
        _output_is(lambda d, m: d / "no" / "such" / "dir" / "out.onnx"),
        2,
        "does not exist",
    ),
    ("output_parent_is_a_file", _output_is(_file_as_dir), 2, "plain"),
    ("output_is_a_directory", _output_is(_existing_dir), 2, "taken.onnx"),
    ("output_equals_input", _output_is(lambda d, m: m), 2, "overwrite the input"),
    (
        "output_equals_input_spelled_differently",
        _output_is(lambda d, m: d / "." / "x" / ".." / m.name),
        2,
        "overwrite the input",
    ),
    ("output_is_symlink_to_input", _output_is(_symlink_to_input), 2, "overwrite the input"),
    ("output_is_hardlink_to_input", _output_is(_hardlink_to_input), 2, "overwrite the input"),
    ("external_data_missing", _missing_data, 2, "not found"),
    ("external_data_truncated", _truncated_data, 2, "truncated"),
    ("external_data_escapes_with_dotdot", _escape_location, 2, "escapes the model's directory"),
    ("external_data_escapes_as_absolute_path", _escape_absolute, 2, "escapes the model's directory"),
    ("external_data_escapes_through_symlink", _escape_symlink, 2, "escapes the model's directory"),
    ("cycle_reaching_output", with_model(cycle_to_output), 2, "cycle"),
    ("cycle_inside_a_site", with_model(cycle_in_site), 2, "cycle"),
    ("unknown_domain_cannot_be_verified", with_model(unknown_domain_after_site), 2, "com.example"),
    ("tensor_data_wrong_size", with_model(bad_tensor_size), 2, "does not match its type and shape"),
    ("no_opset_import", with_model(no_opset), 2, "onnxruntime cannot load"),
    ("ir_version_from_the_future", with_model(future("ir")), 2, "onnxruntime cannot load"),
    ("opset_from_the_future", with_model(future("opset")), 2, "onnxruntime cannot load"),
    (
        "dynamic_rank_without_shape",
        with_model(dynamic_rank),
        2,
        "input 'x' has no known rank; give its shape in --input-shape",
    ),
    ("input_shape_of_wrong_size", with_model(mlp, "--input-shape", "x:2x5"), 2, "input 'x'"),
    ("input_shape_of_wrong_rank", with_model(mlp, "--input-shape", "x:2x4x4"), 2, "input 'x'"),
    ("input_shape_unknown_name", with_model(mlp, "--input-shape", "z:2x4"), 2, "unknown input"),
    ("input_shape_unparsable", with_model(mlp, "--input-shape", "x:axb"), 2, "expected NAME:DxDx"),
    ("negative_threshold", with_model(mlp, "--threshold", "-1"), 2, "threshold"),
    ("bf16_graph_onnxruntime_cannot_run", with_model(lambda: mlp(elem_type=TensorProto.BFLOAT16)), 2, "Gemm"),
    ("verification_fails", with_model(lambda: mlp(slope=0.97), "--max-error", "1e-9"), 1, "nothing written"),
]

# (id, builder, sites collapsed): each must give a correct model.
OUTPUTS: list[tuple[str, Callable[[Path], Invocation], int]] = [
    *[(f"opset_{v}", with_model(lambda v=v: mlp(opset=v)), 1) for v in range(7, 22)],
    *[
        (
            f"ir_{ir}",
            with_model(lambda ir=ir: mlp(opset=max(o for o, i in MIN_IR.items() if i <= ir), ir=ir)),
            1,
        )
        for ir in range(3, 11)
    ],
    ("dynamic_rank_with_shape", with_model(dynamic_rank, "--input-shape", "x:3x4"), 1),
    ("rank_3_matmul", with_model(lambda: mlp(style="matmul", rank=3)), 1),
    ("rank_4_matmul", with_model(lambda: mlp(style="matmul", rank=4)), 1),
    ("int32_graph", with_model(integer_graph(TensorProto.INT32)), 0),
    ("int64_graph", with_model(integer_graph(TensorProto.INT64)), 0),
    ("bool_graph", with_model(bool_graph), 0),
    ("fp16_weights", with_model(lambda: mlp(elem_type=TensorProto.FLOAT16)), 1),
    ("fp64_weights", with_model(lambda: mlp(style="matmul", elem_type=TensorProto.DOUBLE)), 1),
    ("bf16_weights_cast_to_float", with_model(bf16_weights_cast_to_float), 1),
    ("bf16_graph_no_verify", with_model(lambda: mlp(elem_type=TensorProto.BFLOAT16), "--no-verify"), 1),
    ("zero_size_batch", with_model(lambda: mlp(batch=0)), 1),
    ("zero_size_batch_given", with_model(mlp, "--input-shape", "x:0x4"), 1),
    ("zero_size_hidden_dim", with_model(lambda: mlp((4, 0, 4))), 0),
    ("odd_characters_in_names", with_model(odd_names), 1),
    ("graph_output_after_activation", with_model(graph_output_between("fc0_act")), 0),
    ("graph_output_before_activation", with_model(graph_output_between("fc0_out")), 0),
    ("weights_shared_across_layers", with_model(shared_weights), 1),
    ("weight_is_a_graph_input", with_model(weight_input(with_initializer=False)), 0),
    ("weight_is_a_graph_input_with_default", with_model(weight_input(with_initializer=True)), 0),
    ("unknown_domain_inside_site", with_model(unknown_domain_in_site), 0),
    ("unknown_domain_no_verify", with_model(unknown_domain_after_site, "--no-verify"), 1),
    ("if_with_site_in_branch", with_model(if_with_site_inside), 0),
    ("if_branch_reads_hidden_tensor", with_model(if_reading_hidden), 0),
    ("if_after_site", with_model(if_after_site), 1),
    ("loop_with_site_in_body", with_model(loop_with_site_inside), 0),
    ("scan_with_site_in_body", with_model(scan_with_site_inside), 0),
    ("model_local_function", with_model(local_function), 1),
    ("external_data", lambda d: Invocation(external(d)), 1),
    ("sparse_initializer_after_site", with_model(sparse("after")), 1),
    ("sparse_initializer_as_weight", with_model(sparse("weight")), 1),
]
