"""The patterns real exports contain around linear layers: leading-axes reshapes (GPT-2's `Conv1D`,
MatMul-to-Gemm rewrites), per-feature constant steps (LayerScale, scaled inputs, offsets), 1x1
convolutions, `dim_value: -1`, external data read from another working directory.

Each positive case asserts the collapsed sites, the exact op list after, onnxruntime outputs within
rel. 1e-5 and `check_model(full_check=True)` (through `check_fused`); each refusal asserts its reason.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

import lc_onnx
from lc_onnx import cli
from lc_onnx.testing import GraphBuilder, op_types, ort_outputs, rel_l2
from tests.graph.checks import EXACT, check_fused, x2, x3

T = 7  # tokens


def i64(g: GraphBuilder, name: str, values) -> str:
    return g.init(name, np.asarray(values, dtype=np.int64), np.int64)


def runtime_shape(g: GraphBuilder, source: str, last: int, name: str) -> str:
    """`Concat(Shape(source)[:-1], [last])`, the target a `Reshape` computes at run time."""
    lead = g.node("Shape", [source], name=f"{name}/Shape", end=-1)
    return g.node("Concat", [lead, i64(g, f"{name}/last", [last])], name=f"{name}/Concat", axis=0)


def conv1d_model(shapes: str) -> onnx.ModelProto:
    """GPT-2's MLP as both exporters write transformers' `Conv1D`: `Reshape -> Gemm -> Reshape` around
    the activation, with constant or run-time reshape targets."""
    g = GraphBuilder()
    x = g.input("x", ["B", T, 16])
    flat = g.node("Reshape", [x, i64(g, "in_shape", [-1, 16])], name="flat_in")
    h = g.gemm(flat, 16, 64, trans_b=False, name="c_fc")
    if shapes == "constant":
        h = g.node("Reshape", [h, i64(g, "hidden_shape", [-1, T, 64])], name="split_h")
        a = g.prelu(h, 1.0, name="act")
        a = g.node("Reshape", [a, i64(g, "flat_shape", [-1, 64])], name="flat_h")
        y = g.gemm(a, 64, 16, trans_b=False, name="c_proj")
        y = g.node("Reshape", [y, i64(g, "out_shape", [-1, T, 16])], name="split_out")
    else:  # the TorchScript exporter: targets from Shape nodes, some reading the hidden tensor itself
        h = g.node("Reshape", [h, runtime_shape(g, x, 64, "split_h")], name="split_h")
        a = g.prelu(h, 1.0, name="act")
        tail = g.node("Shape", [a], name="tail", start=-1)
        a = g.node("Reshape", [a, g.node("Concat", [i64(g, "minus1", [-1]), tail], axis=0)], name="flat_h")
        y = g.gemm(a, 64, 16, trans_b=False, name="c_proj")
        lead = g.node("Shape", [h], name="lead", end=-1)  # reads the hidden tensor: re-pointed
        y = g.node("Reshape", [y, g.node("Concat", [lead, i64(g, "d_out", [16])], axis=0)], name="split_out")
    g.output(y, ["B", T, 16])
    return g.model(opset=18)


def test_conv1d_with_constant_reshapes_collapses_into_one_gemm():
    result = check_fused(
        conv1d_model("constant"), x3(16, (3, T)), collapsed=1, ops=["Reshape", "Gemm", "Reshape"]
    )
    site = result.report.sites[0]
    assert site.nodes == ["c_fc", "split_h", "act", "flat_h", "c_proj"] and site.activation == "PRelu"
    assert (site.params_before, site.params_after) == (16 * 64 + 64 + 1 + 64 * 16 + 16, 16 * 16 + 16)


def test_conv1d_with_runtime_reshapes_collapses_and_keeps_the_outer_shape():
    model = conv1d_model("runtime")
    result = check_fused(
        model, x3(16, (3, T)), collapsed=1,
        ops=["Reshape", "Shape", "Concat", "Gemm", "Slice", "Concat", "Reshape"],
    )  # fmt: skip
    # The Shape that read the removed hidden tensor now reads the target it was reshaped with.
    lead = next(n for n in result.model.graph.node if n.name == "lead")
    assert lead.op_type == "Slice" and list(lead.input)[0] == "split_h/Concat_out"
    other = x3(16, (5, T), seed=4)  # another batch: the dynamic dim still works
    assert rel_l2(ort_outputs(result.model, other)[0], ort_outputs(model, other)[0]) <= EXACT
    # Run-time reshape targets are computed, not weights: the site counts the same parameters as above.
    site = result.report.sites[0]
    assert (site.params_before, site.params_after) == (16 * 64 + 64 + 1 + 64 * 16 + 16, 16 * 16 + 16)


def test_runtime_reshape_targets_do_not_count_as_parameters_in_the_growth_guard():
    # 1 -> 1 -> 2 with a bias on the first layer only: W1, b1, W2 are 1 + 1 + 2 weights and the
    # collapsed layer needs 2 + 2, so the guard refuses. The Concat targets ([3] int64 each, computed
    # at run time) once counted as 3 parameters that would disappear, and the collapse went through.
    g = GraphBuilder()
    x = g.input("x", [2, "S", 1])
    h = g.gemm(g.node("Reshape", [x, i64(g, "rows0", [-1, 1])]), 1, 1, trans_b=False, name="fc0")
    h = g.node("Reshape", [h, runtime_shape(g, x, 1, "tokens0")], name="tokens0")
    h = g.node("Reshape", [h, i64(g, "rows1", [-1, 1])], name="rows1")
    y = g.gemm(h, 1, 2, trans_b=False, bias=False, name="fc1")
    g.output(g.node("Reshape", [y, runtime_shape(g, x, 2, "tokens1")], name="tokens1"), [2, "S", 2])
    model = g.model(opset=18)
    result = lc_onnx.fuse(model)
    [site] = result.report.sites
    assert (site.decision, site.reason_kind) == ("skipped", "parameter_growth")
    assert site.reason.startswith("collapsing would not reduce parameters: 4 -> 4 with biases")
    assert op_types(result.model) == op_types(model)


def test_matmul_then_flattened_gemm_gets_a_reshape_to_the_heads_shape():
    # MatMul on [B, T, 16], Reshape to rows, Gemm: the new layer reads [B, T, 16] and writes [B*T, 8].
    g = GraphBuilder()
    h = g.matmul(g.input("x", ["B", T, 16]), 16, 64, name="fc1")
    a = g.node("Reshape", [g.prelu(h, 1.0, name="act"), i64(g, "rows", [-1, 64])], name="rows")
    g.output(g.gemm(a, 64, 8, name="fc2"), [None, 8])
    result = check_fused(g.model(), x3(16, (3, T)), collapsed=1, ops=["MatMul", "Add", "Reshape"])
    assert result.model.graph.output[0] == g.model().graph.output[0]


def test_gemm_then_split_matmul_takes_the_last_reshape_target():
    g = GraphBuilder()
    h = g.gemm(g.input("x", ["N", 16]), 16, 64, name="fc1")
    a = g.node("Reshape", [g.prelu(h, 1.0, name="act"), i64(g, "split", [-1, T, 64])], name="split")
    g.output(g.matmul(a, 64, 8, name="fc2"), [None, T, 8])
    feeds = {"x": np.random.default_rng(1).standard_normal((3 * T, 16)).astype(np.float32)}
    check_fused(g.model(), feeds, collapsed=1, ops=["Gemm", "Reshape"], input_shapes={"x": (3 * T, 16)})


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda g, h: g.node("Squeeze", [g.node("Unsqueeze", [h, i64(g, "a0", [0])]), i64(g, "a1", [0])]), id="unsqueeze-squeeze"),
        pytest.param(lambda g, h: g.node("Flatten", [g.node("Unsqueeze", [h, i64(g, "a0", [1])])], axis=2), id="unsqueeze-flatten"),
    ],
)  # fmt: skip
def test_squeeze_unsqueeze_flatten_of_leading_axes_are_transparent(wrap):
    g = GraphBuilder()
    h = g.gemm(g.input("x", ["N", 16]), 16, 64, name="fc1")
    g.output(g.gemm(wrap(g, g.prelu(h, 1.0, name="act")), 64, 8, name="fc2"), ["N", 8])
    check_fused(g.model(opset=18), x2(16), collapsed=1, ops=["Gemm"])


def no_site(model: onnx.ModelProto) -> None:
    result = lc_onnx.fuse(model)
    assert result.report.sites == [] and op_types(result.model) == op_types(model)


@pytest.mark.parametrize(
    ("wrap", "d_next"),
    [
        pytest.param(lambda g, h: g.node("Reshape", [h, i64(g, "s", [-1, 32])]), 32, id="reshape-splits-features"),
        pytest.param(lambda g, h: g.node("Unsqueeze", [h, i64(g, "a", [-1])]), 1, id="unsqueeze-last-axis"),
        pytest.param(lambda g, h: g.node("Transpose", [h], perm=[1, 0]), 4, id="transpose"),
    ],
)  # fmt: skip
def test_reshapes_that_touch_the_feature_axis_end_the_match(wrap, d_next):
    g = GraphBuilder()
    h = g.gemm(g.input("x", [4, 16]), 16, 64, name="fc1")
    y = wrap(g, g.prelu(h, 1.0, name="act"))
    g.output(g.node("MatMul", [y, g.init("w2", g.random((d_next, 8)))], name="fc2"), None)
    no_site(g.model(opset=18))


def test_leading_shape_known_only_at_run_time_is_refused_with_a_reason():
    g = GraphBuilder()
    x = g.input("x", ["B", "T", 16])
    h = g.gemm(g.node("Reshape", [x, i64(g, "rows", [-1, 16])]), 16, 64, name="fc1")
    a = g.node("Reshape", [g.prelu(h, 1.0, name="act"), runtime_shape(g, x, 64, "split")], name="split")
    g.output(g.matmul(a, 64, 8, name="fc2"), ["B", "T", 8])
    result = lc_onnx.fuse(g.model(opset=18))
    (site,) = result.report.sites
    assert site.decision == "skipped" and site.reason_kind == "unsupported"
    assert site.reason == (
        "the reshapes between fc1 and fc2 regroup the leading axes into a shape known only at run time"
    )


@pytest.mark.parametrize(
    "step",
    [
        pytest.param(lambda g, h: g.node("Mul", [h, g.init(g.fresh("s"), g.rng.uniform(0.5, 1.5, 64))]), id="mul"),
        pytest.param(lambda g, h: g.node("Mul", [g.init(g.fresh("s"), np.float32(0.7)), h]), id="mul-scalar-first"),
        pytest.param(lambda g, h: g.node("Add", [h, g.init(g.fresh("c"), g.random((1, 64)))]), id="add-row"),
        pytest.param(lambda g, h: g.node("Sub", [h, g.init(g.fresh("c"), g.random((64,)))]), id="sub"),
        pytest.param(lambda g, h: g.node("Sub", [g.init(g.fresh("c"), g.random((64,))), h]), id="sub-from"),
        pytest.param(lambda g, h: g.node("Div", [h, g.init(g.fresh("d"), g.rng.uniform(0.5, 2.0, (1, 64)))]), id="div"),
    ],
)  # fmt: skip
def test_per_feature_constant_steps_between_layers_fold(step):
    g = GraphBuilder()
    h = g.gemm(g.input("x", ["N", 16]), 16, 64, name="fc1")
    g.output(g.gemm(step(g, g.prelu(step(g, h), 1.0, name="act")), 64, 8, name="fc2"), ["N", 8])
    result = check_fused(g.model(), x2(16), collapsed=1, ops=["Gemm"])
    assert result.report.sites[0].reason_kind == "exact"


def layerscale_block(g: GraphBuilder, x: str, i: int, gamma: str, *, first: bool = False) -> str:
    """`x + gamma ⊙ fc2(act(fc1(x)))`, DeiT-III's LayerScale (CaiT writes gamma first)."""
    h = g.matmul(x, 16, 64, name=f"b{i}.fc1")
    y = g.matmul(g.prelu(h, 1.0, name=f"b{i}.act"), 64, 16, name=f"b{i}.fc2")
    scaled = g.node("Mul", [gamma, y] if first else [y, gamma], name=f"b{i}.ls")
    return g.node("Add", [x, scaled], name=f"b{i}.residual")


@pytest.mark.parametrize("first", [False, True])
def test_layerscale_after_fc2_folds_into_the_collapsed_layer(first):
    g = GraphBuilder()
    x = g.input("x", ["B", T, 16])
    g.output(
        layerscale_block(g, x, 0, g.init("gamma", g.rng.uniform(0.3, 0.7, 16)), first=first), ["B", T, 16]
    )
    result = check_fused(g.model(), x3(16, (2, T)), collapsed=1, ops=["MatMul", "Add", "Add"])
    site = result.report.sites[0]
    assert site.nodes[-1] == "b0.ls" and site.params_before == 16 * 64 + 64 + 1 + 64 * 16 + 16 + 16


def test_one_gamma_shared_by_every_layerscale_folds_into_each_block():
    # The dynamo exporter merges equal initializers: a fresh DeiT-III has one gamma for all its blocks.
    g = GraphBuilder()
    gamma = g.init("gamma", np.full(16, 0.5))
    x = layerscale_block(g, g.input("x", ["B", T, 16]), 0, gamma)
    g.output(layerscale_block(g, x, 1, gamma), ["B", T, 16])
    result = check_fused(g.model(), x3(16, (2, T)), collapsed=2, ops=["MatMul", "Add", "Add"] * 2)
    assert "gamma" not in {t.name for t in result.model.graph.initializer}
    # Each block alone would leave gamma to the other one; counted per round, the totals are exact.
    block, collapsed = 16 * 64 + 64 + 1 + 64 * 16 + 16, 16 * 16 + 16
    assert (result.report.params_before, result.report.params_after) == (2 * block + 16, 2 * collapsed)


def test_scaled_input_before_the_first_layer_folds():
    g = GraphBuilder()
    x = g.node(
        "Add",
        [
            g.node("Mul", [g.input("x", ["N", 16]), g.init("s", g.rng.uniform(0.5, 1.5, 16))]),
            g.init("t", g.random((16,))),
        ],
    )
    h = g.gemm(x, 16, 64, name="fc1")
    g.output(g.gemm(g.prelu(h, 1.0, name="act"), 64, 8, name="fc2"), ["N", 8])
    result = check_fused(g.model(), x2(16), collapsed=1, ops=["Gemm"])
    assert result.report.sites[0].nodes[:3] == ["mul1", "add2", "fc1"]


@pytest.mark.parametrize(
    "constant",
    [
        pytest.param(lambda g: g.init("c", g.random((5, 1))), id="varies-along-the-batch"),
        pytest.param(lambda g: g.init("c", np.r_[np.zeros(1), np.ones(63)]), id="div-by-zero"),
        pytest.param(lambda g: g.input("c", [64]), id="graph-input"),
    ],
)
def test_non_per_feature_steps_end_the_match(constant):
    g = GraphBuilder()
    h = g.gemm(g.input("x", [5, 16]), 16, 64, name="fc1")
    h = g.node("Div", [g.prelu(h, 1.0, name="act"), constant(g)])
    g.output(g.gemm(h, 64, 8, name="fc2"), [5, 8])
    assert lc_onnx.fuse(g.model()).report.sites == []


@pytest.mark.parametrize("spatial", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_1x1_conv_chain_with_batchnorm_and_scale_collapses_into_one_conv(spatial, bias):
    g = GraphBuilder()
    x = g.input("x", ["N", 8, *([5] * spatial)])
    h = g.conv1x1(x, 8, 32, spatial=spatial, bias=bias, name="fc1")
    h = g.batchnorm(g.prelu(h, 1.0, shape=(32, *([1] * spatial)), name="act"), 32, name="bn")
    y = g.conv1x1(h, 32, 4, spatial=spatial, bias=bias, name="fc2")
    g.output(
        g.node("Mul", [y, g.init("scale", g.rng.uniform(0.3, 0.7, (4, *([1] * spatial))))], name="ls"),
        ["N", 4, *([5] * spatial)],
    )
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 8, *([5] * spatial))).astype(np.float32)}
    result = check_fused(g.model(), feeds, collapsed=1, ops=["Conv"])
    (conv,) = result.model.graph.node
    assert [d for t in result.model.graph.initializer if t.name == conv.input[1] for d in t.dims] == [
        4,
        8,
    ] + [1] * spatial
    assert result.report.macs_after == 2 * 4 * 8 * 5**spatial


@pytest.mark.parametrize(
    "attrs",
    [
        pytest.param({"group": 2}, id="grouped"),
        pytest.param({"strides": [2, 2]}, id="strided"),
        pytest.param({"pads": [1, 1, 1, 1]}, id="padded"),
        pytest.param({"dilations": [2, 2]}, id="dilated"),
    ],
)
def test_convolutions_that_are_not_per_position_linear_maps_are_no_layers(attrs):
    g = GraphBuilder()
    h = g.conv1x1(g.input("x", [1, 8, 6, 6]), 8, 8, name="fc1")
    g.nodes[-1].attribute.extend(onnx.helper.make_attribute(k, v) for k, v in attrs.items())
    groups = attrs.get("group", 1)
    w = g.init("w2", g.random((4, 8 // groups, 1, 1)))
    g.output(g.node("Conv", [g.prelu(h, 1.0), w], kernel_shape=[1, 1], group=groups), None)
    assert lc_onnx.fuse(g.model()).report.sites == []


def test_3x3_conv_is_no_linear_layer():
    g = GraphBuilder()
    h = g.conv1x1(g.input("x", [1, 8, 6, 6]), 8, 8, name="fc1")
    w = g.init("w2", g.random((4, 8, 3, 3)))
    g.output(g.node("Conv", [g.prelu(h, 1.0), w], kernel_shape=[3, 3]), None)
    assert lc_onnx.fuse(g.model()).report.sites == []


def mlp_model(d: int = 16) -> onnx.ModelProto:
    g = GraphBuilder()
    x = g.input("x", [-1, d])
    h = g.gemm(x, d, 4 * d, name="fc1")
    y = g.gemm(g.prelu(h, 1.0, name="act"), 4 * d, d, name="fc2")
    g.output(g.node("Mul", [y, g.init("gamma", g.rng.uniform(0.3, 0.7, d))], name="ls"), [-1, d])
    return g.model()


def test_batch_dim_written_minus_one_is_dynamic(tmp_path, capsys):
    # Paddle2ONNX and some older exporters write the batch as dim_value -1; onnxruntime runs it.
    model = mlp_model()
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
    onnx.save(model, tmp_path / "m.onnx")
    assert cli.main(["fuse", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "f.onnx")]) == 0
    assert "1 of 1 site(s) collapsed" in capsys.readouterr().out
    fused = onnx.load(tmp_path / "f.onnx")
    assert fused.graph.input == model.graph.input and op_types(fused) == ["Gemm"]
    feeds = x2(16, n=3)  # not the verification batch
    assert rel_l2(ort_outputs(fused, feeds)[0], ort_outputs(model, feeds)[0]) <= EXACT


def test_layerscale_with_external_data_fused_from_another_directory(tmp_path):
    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    models.mkdir(), elsewhere.mkdir()
    source = models / "m.onnx"
    onnx.save(mlp_model(), source, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    before = {p.name: p.read_bytes() for p in models.iterdir()}
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        result = lc_onnx.fuse(source, output=models / "m.fused.onnx")
        assert cli.main(["fuse", str(source), "-o", str(models / "cli.onnx")]) == 0
    finally:
        os.chdir(cwd)
    assert result.collapsed == 1 and result.report.sites[0].nodes[-1] == "ls"
    assert {p.name: p.read_bytes() for p in models.iterdir() if p.name in before} == before
    assert sorted(p.name for p in elsewhere.iterdir()) == []
    feeds = x2(16, n=3)
    expected = ort_outputs(str(source), feeds)[0]
    for name in ("m.fused.onnx", "cli.onnx"):
        assert rel_l2(ort_outputs(str(models / name), feeds)[0], expected) <= EXACT


def skip_layernorm(g: GraphBuilder, x: str, skip: str, name: str, bias: str | None = None) -> str:
    inputs = [
        x,
        skip,
        g.init(f"{name}.gamma", g.rng.uniform(0.5, 1.5, 16)),
        g.init(f"{name}.beta", g.random((16,))),
    ]
    g.nodes.append(
        onnx.helper.make_node(
            "SkipLayerNormalization", inputs + ([bias] if bias else []), [f"{name}_out"], name=name,
            domain="com.microsoft", epsilon=1e-5,
        )
    )  # fmt: skip
    return f"{name}_out"


def test_linear_layers_around_skip_layernorm_collapse_and_are_counted():
    # onnxruntime's transformers optimizer folds fc2's bias into the SkipLayerNormalization after it.
    g = GraphBuilder()
    x, skip = g.input("x", ["B", "T", 16]), g.input("skip", ["B", "T", 16])
    y0 = skip_layernorm(g, x, skip, "ln0")
    h = g.matmul(y0, 16, 64, name="fc1")
    y = g.matmul(g.prelu(h, 1.0, name="act"), 64, 16, name="fc2", bias=False)
    g.output(skip_layernorm(g, y, y0, "ln1", bias=g.init("fc2.bias", g.random((16,), 0.1))), ["B", "T", 16])
    model = g.model()
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    rng = np.random.default_rng(1)
    feeds = {k: rng.standard_normal((2, T, 16)).astype(np.float32) for k in ("x", "skip")}
    shapes = {"x": (2, T, 16), "skip": (2, T, 16)}
    ops = ["SkipLayerNormalization", "MatMul", "Add", "SkipLayerNormalization"]
    result = check_fused(model, feeds, collapsed=1, ops=ops, input_shapes=shapes)
    assert (result.report.macs_before, result.report.macs_after) == (2 * T * 2 * 16 * 64, 2 * T * 16 * 16)
