"""Every pattern the pass collapses and every refusal, end to end through `lc_onnx.fuse`.

Each positive case asserts the number of collapsed sites, the exact op list after, onnxruntime outputs of
original vs fused and `check_model(full_check=True)`; each refusal asserts its reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import lc_onnx
from lc_onnx.errors import VerificationError
from lc_onnx.testing import GraphBuilder, op_types, ort_outputs, rel_l2
from tests.graph.checks import EXACT, check_fused, x2, x3


def mlp2(act, *, trans_b=True, d=(16, 64, 8), rank=2, opset=17, dtype=np.float32) -> onnx.ModelProto:
    """Linear(d0->d1) -> act -> Linear(d1->d2); `act(g, h)` adds activation nodes and returns the tensor."""
    g = GraphBuilder(dtype=dtype)
    if rank == 2:
        x = g.input("x", ["N", d[0]])
        h = g.gemm(x, d[0], d[1], trans_b=trans_b, name="fc1")
        y = g.gemm(act(g, h), d[1], d[2], trans_b=trans_b, name="fc2")
        g.output(y, ["N", d[2]])
    else:
        lead = ["A", "B", "T"][3 - (rank - 1) :]
        x = g.input("x", [*lead, d[0]])
        h = g.matmul(x, d[0], d[1], name="fc1")
        y = g.matmul(act(g, h), d[1], d[2], name="fc2")
        g.output(y, [*lead, d[2]])
    return g.model(opset=opset)


def prelu_one(g, h):
    return g.prelu(h, 1.0, name="act")


@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_prelu_gemm_collapses_to_one_gemm(trans_b):
    result = check_fused(mlp2(prelu_one, trans_b=trans_b), x2(16), collapsed=1, ops=["Gemm"])
    site = result.report.sites[0]
    assert site.nodes == ["fc1", "act", "fc2"]
    assert site.activation == "PRelu"
    assert (site.params_before, site.params_after) == (16 * 64 + 64 + 1 + 64 * 8 + 8, 16 * 8 + 8)
    assert result.report.params_before - result.report.params_after == site.params_before - site.params_after
    assert result.report.verification.outputs[result.model.graph.output[0].name].rel_l2 <= EXACT


def test_gemm_alpha_beta_are_folded():
    g = GraphBuilder()
    x = g.input("x", ["N", 6])
    h = g.node(
        "Gemm", [x, g.init("w1", g.random((6, 12))), g.init("b1", g.random((1, 12)))], alpha=0.5, beta=2.0
    )
    y = g.node(
        "Gemm",
        [g.prelu(h, 1.0), g.init("w2", g.random((3, 12))), g.init("b2", g.random((3,)))],
        transB=1,
        alpha=3.0,
    )
    g.output(y, ["N", 3])
    check_fused(g.model(), x2(6), collapsed=1, ops=["Gemm"])


@pytest.mark.parametrize("rank,shape", [(3, (3, 7)), (3, (1, 1)), (4, (2, 3, 5))])
def test_matmul_add_on_token_tensors_with_dynamic_dims(rank, shape):
    model = mlp2(prelu_one, rank=rank)
    feeds = x3(16, shape)
    result = check_fused(
        model, feeds, collapsed=1, ops=["MatMul", "Add"], input_shapes={"x": feeds["x"].shape}
    )
    assert result.report.sites[0].nodes == ["fc1", "fc1/Add", "act", "fc2", "fc2/Add"]
    # Dynamic dims survive: the fused model runs at other sizes than the verification ones.
    other = x3(16, tuple(s + 2 for s in shape), seed=5)
    assert rel_l2(ort_outputs(result.model, other)[0], ort_outputs(model, other)[0]) <= EXACT


def test_matmul_without_bias_emits_no_add():
    g = GraphBuilder()
    x = g.input("x", ["B", "T", 16])
    h = g.matmul(x, 16, 64, bias=False, name="fc1")
    y = g.matmul(g.prelu(h, 1.0), 64, 8, bias=False, name="fc2")
    g.output(y, ["B", "T", 8])
    check_fused(g.model(), x3(16), collapsed=1, ops=["MatMul"])


@pytest.mark.parametrize(
    "slope_shape,rank",
    [
        ((1,), 2),
        ((64,), 2),
        ((1, 1), 2),
        ((1, 64), 2),
        ((1,), 3),
        ((1, 1, 1), 3),
        ((64,), 3),
        ((1, 1, 64), 3),
    ],
)
def test_prelu_slope_shapes(slope_shape, rank):
    model = mlp2(lambda g, h: g.prelu(h, 1.0, shape=slope_shape, name="act"), rank=rank)
    ops = ["Gemm"] if rank == 2 else ["MatMul", "Add"]
    check_fused(model, x2(16) if rank == 2 else x3(16), collapsed=1, ops=ops)


@pytest.mark.parametrize(
    "act",
    [
        pytest.param(lambda g, h: g.node("Identity", [h]), id="identity"),
        pytest.param(lambda g, h: g.node("Dropout", [h], n_out=1), id="dropout"),
        pytest.param(
            lambda g, h: g.node("Dropout", [h, g.init("ratio", np.array(0.3), np.float32)]),
            id="dropout-ratio",
        ),
        pytest.param(lambda g, h: g.node("LeakyRelu", [h], alpha=1.0), id="leakyrelu-1"),
        pytest.param(lambda g, h: h, id="nothing"),
        pytest.param(lambda g, h: g.batchnorm(g.prelu(h, 1.0), 64), id="prelu-bn"),
        pytest.param(lambda g, h: g.prelu(g.batchnorm(h, 64), 1.0), id="bn-prelu"),
        pytest.param(
            lambda g, h: g.node("Identity", [g.batchnorm(g.node("Dropout", [h]), 64)]),
            id="dropout-bn-identity",
        ),
    ],
)
def test_exactly_linear_steps_collapse_exactly(act):
    result = check_fused(mlp2(act), x2(16), collapsed=1, ops=["Gemm"])
    assert result.report.sites[0].extra["exact"] is True


def test_chain_of_four_layers_collapses_into_one():
    g = GraphBuilder()
    x = g.input("x", ["B", "T", 8])
    h = g.matmul(x, 8, 32, name="l0")
    h = g.matmul(g.prelu(h, 1.0), 32, 48, name="l1")
    h = g.matmul(g.node("Identity", [h]), 48, 40, name="l2")
    h = g.matmul(g.prelu(h, 1.0, shape=(40,)), 40, 4, name="l3")
    g.output(h, ["B", "T", 4])
    result = check_fused(g.model(), x3(8), collapsed=1, ops=["MatMul", "Add"])
    site = result.report.sites[0]
    assert site.nodes[0] == "l0" and site.nodes[-1] == "l3/Add"
    assert site.params_after == 8 * 4 + 4


def test_chain_is_cut_where_collapsing_would_grow_parameters():
    # a: 64->4, b: 4->64, c: 64->96, d: 96->16. a+b is a bottleneck (64·64 >= 4·128); b..d collapse into
    # one 4->16 layer (64 weights instead of 256 + 6144 + 1536).
    g = GraphBuilder()
    x = g.input("x", ["N", 64])
    h = g.gemm(x, 64, 4, name="a")
    h = g.gemm(g.prelu(h, 1.0, name="act_ab"), 4, 64, name="b")
    h = g.gemm(g.prelu(h, 1.0, name="act_bc"), 64, 96, name="c")
    h = g.gemm(g.prelu(h, 1.0, name="act_cd"), 96, 16, name="d")
    g.output(h, ["N", 16])
    result = check_fused(g.model(), x2(64), collapsed=1, ops=["Gemm", "PRelu", "Gemm"])
    collapsed, skipped = result.report.sites
    assert collapsed.nodes == ["b", "act_bc", "c", "act_cd", "d"] and collapsed.params_after == 4 * 16 + 16
    assert skipped.nodes[:2] == ["a", "act_ab"]
    # Skip reasons describe the final graph, where a's neighbour is the collapsed 4->16 layer.
    assert skipped.reason.startswith(
        "collapsing would not reduce parameters: d_in·d_out = 64·16 = 1024 >= d_h·(d_in+d_out) = 4·80 = 320"
    )


def test_bottleneck_refused_unless_allow_growth():
    model = mlp2(prelu_one, d=(32, 4, 32))
    result = check_fused(model, x2(32), collapsed=0, ops=["Gemm", "PRelu", "Gemm"])
    assert result.report.sites[0].reason.startswith(
        "collapsing would not reduce parameters: d_in·d_out = 32·32"
    )
    grown = check_fused(model, x2(32), collapsed=1, ops=["Gemm"], allow_growth=True)
    assert grown.report.params_after > grown.report.params_before


def test_collapse_that_needs_a_new_bias_and_saves_nothing_is_refused():
    # 1 -> 1 -> 3: weights 1 + 3 shrink to 3, but the first bias forces a bias of 3 on the new layer:
    # 1 + 1 (bias) + 1 (slope) + 3 = 6 parameters would become 3 + 3 = 6.
    g = GraphBuilder()
    h = g.gemm(g.input("x", ["N", 1]), 1, 1, name="fc1")
    g.output(g.gemm(g.prelu(h, 1.0, name="act"), 1, 3, bias=False, name="fc2"), ["N", 3])
    model = g.model()
    result = check_fused(model, x2(1), collapsed=0, ops=["Gemm", "PRelu", "Gemm"])
    assert result.report.sites[0].reason.startswith(
        "collapsing would not reduce parameters: 6 -> 6 with biases"
    )
    grown = check_fused(model, x2(1), collapsed=1, ops=["Gemm"], allow_growth=True)
    assert grown.report.params_after == grown.report.params_before == 6


def test_fan_out_gives_each_head_its_own_layer():
    g = GraphBuilder()
    x = g.input("x", ["N", 8])
    h = g.prelu(g.gemm(x, 8, 64, name="trunk"), 1.0, name="act")
    g.output(g.gemm(h, 64, 4, name="head_a"), ["N", 4])
    g.output(g.gemm(h, 64, 6, name="head_b"), ["N", 6])
    result = check_fused(g.model(), x2(8), collapsed=1, ops=["Gemm", "Gemm"])
    site = result.report.sites[0]
    assert site.nodes == ["trunk", "act", "head_a", "head_b"]
    assert site.params_after == (8 * 4 + 4) + (8 * 6 + 6)


def test_fan_out_that_would_grow_is_skipped():
    g = GraphBuilder()
    x = g.input("x", ["N", 32])
    h = g.prelu(g.gemm(x, 32, 8, name="trunk"), 1.0, name="act")
    g.output(g.gemm(h, 8, 32, name="head_a"), ["N", 32])
    g.output(g.gemm(h, 8, 32, name="head_b"), ["N", 32])
    result = check_fused(g.model(), x2(32), collapsed=0, ops=["Gemm", "PRelu", "Gemm", "Gemm"])
    assert "heads would not reduce parameters" in result.report.sites[0].reason


@pytest.mark.parametrize("slope", [0.97, 1.03])
def test_near_linear_slope_collapses_and_reports_measured_error(slope):
    model = mlp2(lambda g, h: g.prelu(h, slope, name="act"), rank=3)
    feeds = x3(16)
    result = lc_onnx.fuse(model, max_error=0.1, feeds=[feeds])
    assert result.collapsed == 1 and result.report.sites[0].extra["exact"] is False
    measured = rel_l2(ort_outputs(result.model, feeds)[0], ort_outputs(model, feeds)[0])
    reported = result.report.verification.outputs[result.model.graph.output[0].name].rel_l2
    assert reported == pytest.approx(measured, rel=1e-6)
    assert 1e-4 < reported < 0.1  # the pretended slope of 1 costs something, and it is reported
    with pytest.raises(VerificationError, match="relative L2 error"):
        lc_onnx.fuse(model, max_error=reported / 2, feeds=[feeds])


def test_leakyrelu_near_one_uses_threshold():
    model = mlp2(lambda g, h: g.node("LeakyRelu", [h], name="act", alpha=0.96))
    assert lc_onnx.fuse(model, max_error=1.0).collapsed == 1
    skipped = lc_onnx.fuse(model, threshold=0.01)
    assert skipped.collapsed == 0
    assert skipped.report.sites[0].reason == "LeakyRelu act: slopes 0.96..0.96 are not within 0.01 of 1"


def test_weights_from_constant_nodes_and_constant_subgraphs():
    g = GraphBuilder()
    x = g.input("x", ["N", 16])
    w1 = g.random((16, 64))
    g.nodes.append(
        onnx.helper.make_node("Constant", [], ["w1t"], value=onnx.numpy_helper.from_array(w1.T.copy()))
    )
    w1_folded = g.node("Transpose", ["w1t"], name="w1_transpose", perm=[1, 0])
    h = g.node("Gemm", [x, w1_folded, g.init("b1", g.random((64,)))], name="fc1")
    w2 = g.node(
        "Reshape", [g.init("w2flat", g.random((64 * 8,))), g.init("shape", np.array([8, 64]), np.int64)]
    )
    y = g.node("Gemm", [g.prelu(h, 1.0), w2], name="fc2", transB=1)
    g.output(y, ["N", 8])
    check_fused(g.model(), x2(16), collapsed=1, ops=["Gemm"])


def refusal(build) -> str:
    result = lc_onnx.fuse(build())
    assert result.collapsed == 0, result.report.to_json()
    assert op_types(result.model) == op_types(build())
    return result.report.sites[0].reason


def test_refuses_graph_output_between_layers():
    def build():
        g = GraphBuilder()
        h = g.gemm(g.input("x", ["N", 16]), 16, 64, name="fc1")
        g.output(g.gemm(g.prelu(h, 1.0, name="act"), 64, 8, name="fc2"), ["N", 8])
        g.output(h, ["N", 64])
        return g.model()

    assert refusal(build) == "'fc1_out' between the layers is a graph output"


def test_refuses_intermediate_with_another_consumer():
    def build():
        g = GraphBuilder()
        h = g.prelu(g.gemm(g.input("x", ["N", 16]), 16, 64, name="fc1"), 1.0, name="act")
        g.output(g.gemm(h, 64, 8, name="fc2"), ["N", 8])
        g.output(g.node("Relu", [h], name="side"), ["N", 64])
        return g.model()

    assert refusal(build) == "'act_out' also feeds side"


def test_refuses_weight_that_is_a_graph_input():
    def build():
        g = GraphBuilder()
        x = g.input("x", ["N", 16])
        g.input("w2", [8, 64])
        h = g.prelu(g.gemm(x, 16, 64, name="fc1"), 1.0)
        g.output(g.node("Gemm", [h, "w2"], name="fc2", transB=1), ["N", 8])
        return g.model()

    assert refusal(build) == "weight 'w2' of fc2 is a graph input"


def test_weight_shared_with_a_layer_outside_the_site_collapses_and_stays_for_it():
    # Exporters deduplicate equal tensors (a fresh model's zero biases): fc1's weight and bias are also
    # read by `side`. The composite gets tensors of its own; the shared ones stay for `side`, and the
    # parameter guard counts only what disappears.
    g = GraphBuilder()
    x = g.input("x", ["N", 16])
    h = g.prelu(g.gemm(x, 16, 64, name="fc1"), 1.0, name="act")
    g.output(g.gemm(h, 64, 8, name="fc2"), ["N", 8])
    g.output(g.node("Gemm", [x, "fc1.weight", "fc1.bias"], name="side", transB=1), ["N", 64])
    result = check_fused(g.model(), x2(16), collapsed=1, ops=["Gemm", "Gemm"])
    assert {"fc1.weight", "fc1.bias"} <= {t.name for t in result.model.graph.initializer}
    site = result.report.sites[0]
    assert (site.params_before, site.params_after) == (1 + 64 * 8 + 8, 16 * 8 + 8)
    assert result.report.params_before - result.report.params_after == site.params_before - site.params_after


def test_weight_shared_by_both_layers_of_the_site_collapses():
    g = GraphBuilder()
    x = g.input("x", ["N", 16])
    h = g.prelu(g.gemm(x, 16, 16, name="fc1"), 1.0)
    g.output(g.node("Gemm", [h, "fc1.weight"], name="fc2", transB=1), ["N", 16])
    result = check_fused(g.model(), x2(16), collapsed=1, ops=["Gemm"])
    assert result.report.params_after == 16 * 16 + 16


def test_refuses_non_float_dtype():
    def build():
        g = GraphBuilder(dtype=np.int32)
        x = g.input("x", ["N", 4])
        h = g.node("MatMul", [x, g.init("w1", np.ones((4, 16)))], name="fc1")
        y = g.node("MatMul", [g.node("Identity", [h]), g.init("w2", np.ones((16, 2)))], name="fc2")
        g.output(y, ["N", 2])
        return g.model()

    assert refusal(build) == "fc1 has dtype int32, not floating point"


@pytest.mark.parametrize("op", ["Relu", "Gelu", "Tanh", "Sigmoid"])
def test_refuses_nonlinear_activation(op):
    assert (
        refusal(lambda: mlp2(lambda g, h: g.node(op, [h], name="act"), opset=20)) == f"{op} act is not linear"
    )


def test_refuses_slope_outside_threshold():
    reason = refusal(
        lambda: mlp2(lambda g, h: g.prelu(h, np.linspace(0.9, 1.0, 64), shape=(64,), name="act"))
    )
    assert reason == "PRelu act: slopes 0.9..1 are not within 0.05 of 1"


def test_refuses_batchnorm_on_token_axis():
    assert refusal(lambda: mlp2(lambda g, h: g.batchnorm(h, 7, name="bn"), rank=3)).startswith(
        "BatchNormalization bn normalises axis 1 of a rank-3 tensor"
    )


@pytest.mark.parametrize("dtype,tol", [(np.float16, 2e-3), (np.float64, 1e-12)])
def test_weight_dtype_is_kept(dtype, tol):
    model = mlp2(prelu_one, dtype=dtype)
    feeds = {"x": x2(16)["x"].astype(dtype)}
    result = check_fused(model, feeds, collapsed=1, ops=["Gemm"], tol=tol)
    assert {t.data_type for t in result.model.graph.initializer} == {
        onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    }


def test_model_fields_and_interface_are_kept():
    model = mlp2(prelu_one, rank=3, opset=18)
    model.ir_version = 8
    model.producer_name, model.doc_string, model.model_version = "me", "my doc", 7
    onnx.helper.set_model_props(model, {"author": "lc", "task": "test"})
    model.graph.doc_string = "graph doc"
    result = lc_onnx.fuse(model)
    fused = result.model
    assert (fused.ir_version, fused.producer_name, fused.doc_string, fused.model_version) == (
        8,
        "me",
        "my doc",
        7,
    )
    assert [(p.domain, p.version) for p in fused.opset_import] == [("", 18)]
    assert {p.key: p.value for p in fused.metadata_props} == {"author": "lc", "task": "test"}
    assert fused.graph.doc_string == "graph doc"
    assert fused.graph.input == model.graph.input and fused.graph.output == model.graph.output


def test_fusing_twice_equals_fusing_once():
    once = lc_onnx.fuse(mlp2(prelu_one, rank=3)).model
    twice = lc_onnx.fuse(once)
    assert twice.collapsed == 0
    assert twice.model.SerializeToString() == once.SerializeToString()


def test_nothing_to_collapse_returns_the_same_graph():
    model = mlp2(lambda g, h: g.node("Relu", [h], name="act"))
    result = lc_onnx.fuse(model)
    assert result.model.SerializeToString() == model.SerializeToString()
    assert result.report.verification.outputs == {}


def test_disabled_verification_note_names_no_command_line_flag():
    # The library speaks in parameters: a Python caller passed verify=False, not --no-verify.
    result = lc_onnx.fuse(mlp2(prelu_one), verify=False)
    assert result.collapsed == 1
    assert result.report.verification.note == "verification disabled"
