from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto, helper

from lc_onnx.errors import UserError
from lc_onnx.model.macs import count_macs, count_params, macs_by_node


def _model(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("[4, 5]", "[5, 6]", 4 * 5 * 6),
        ("[2, 3, 4, 5]", "[5, 6]", 2 * 3 * 4 * 5 * 6),
        # batch dims broadcast [2, 1] x [3] -> [2, 3]
        ("[2, 1, 4, 5]", "[3, 5, 6]", 2 * 3 * 4 * 5 * 6),
        ("[5]", "[5, 6]", 5 * 6),
        ("[2, 4, 5]", "[5]", 2 * 4 * 5),
    ],
)
def test_matmul_broadcast(a: str, b: str, expected: int) -> None:
    model = _model(f"{HEADER} g (float{a} A, float{b} B) => (float Y) {{ Y = MatMul(A, B) }}")
    assert count_macs(model) == expected


@pytest.mark.parametrize(
    ("attrs", "a", "b"),
    [
        ("", "[4, 5]", "[5, 6]"),
        ("<transA = 1>", "[5, 4]", "[5, 6]"),
        ("<transB = 1>", "[4, 5]", "[6, 5]"),
        ("<transA = 1, transB = 1>", "[5, 4]", "[6, 5]"),
    ],
)
def test_gemm_transposes(attrs: str, a: str, b: str) -> None:
    model = _model(
        f"{HEADER} g (float{a} A, float{b} B, float[6] C) => (float Y) {{ Y = Gemm{attrs}(A, B, C) }}"
    )
    assert count_macs(model) == 4 * 5 * 6


@pytest.mark.parametrize(
    ("x", "w", "attrs", "expected"),
    [
        # groups=2: 8 in, 6 out, each output reads 4 channels * 3*3 kernel over a 10x10 output
        ("[1, 8, 12, 12]", "[6, 4, 3, 3]", "<group = 2>", 1 * 6 * 10 * 10 * 4 * 9),
        # depthwise, stride 2, padding 1: 16x16 -> 8x8
        (
            "[2, 8, 16, 16]",
            "[8, 1, 3, 3]",
            "<group = 8, strides = [2, 2], pads = [1, 1, 1, 1]>",
            2 * 8 * 8 * 8 * 1 * 9,
        ),
        ("[1, 3, 20]", "[4, 3, 5]", "", 1 * 4 * 16 * 3 * 5),
        ("[1, 2, 6, 6, 6]", "[4, 2, 3, 3, 3]", "", 1 * 4 * 4 * 4 * 4 * 2 * 27),
    ],
)
def test_conv_groups_and_rank(x: str, w: str, attrs: str, expected: int) -> None:
    model = _model(f"{HEADER} g (float{x} X, float{w} W) => (float Y) {{ Y = Conv{attrs}(X, W) }}")
    assert count_macs(model) == expected


def test_symbolic_dims_take_input_shapes_and_default_to_one() -> None:
    model = _model(
        f"{HEADER} g (float[N, S, 5] A, float[5, 6] B) => (float Y) {{ H = MatMul(A, B)\n Y = Relu(H) }}"
    )
    assert count_macs(model) == 1 * 1 * 5 * 6
    assert count_macs(model, {"A": [8, 3, 5]}) == 8 * 3 * 5 * 6


def _vit_like_attention(batch_dim: str = "N") -> onnx.ModelProto:
    """x -> qkv projection -> Reshape to heads -> q @ k^T -> Softmax -> @ v; shapes flow via data_prop."""
    text = f"""{HEADER}
    g (float[{batch_dim}, 10, 8] x) => (float y) <int64[4] shp = {{0, 10, 2, 4}}> {{
        q = MatMul(x, wq)
        k = MatMul(x, wk)
        v = MatMul(x, wv)
        qh = Reshape(q, shp)
        kh = Reshape(k, shp)
        vh = Reshape(v, shp)
        qt = Transpose<perm = [0, 2, 1, 3]>(qh)
        kt = Transpose<perm = [0, 2, 3, 1]>(kh)
        vt = Transpose<perm = [0, 2, 1, 3]>(vh)
        s = MatMul(qt, kt)
        p = Softmax<axis = -1>(s)
        y = MatMul(p, vt)
    }}"""
    model = onnx.parser.parse_model(text)
    for name in ("wq", "wk", "wv"):
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((8, 8), np.float32), name))
    onnx.checker.check_model(model)
    return model


def test_attention_matmuls_are_counted_per_node() -> None:
    model = _vit_like_attention()
    per_node = macs_by_node(model, {"x": [3, 10, 8]})
    projections = 3 * (3 * 10 * 8 * 8)
    scores = 3 * 2 * 10 * 4 * 10
    context = 3 * 2 * 10 * 10 * 4
    assert sorted(per_node.values()) == sorted([3 * 10 * 8 * 8] * 3 + [scores, context])
    assert count_macs(model, {"x": [3, 10, 8]}) == projections + scores + context


def test_works_without_external_data_and_on_dims_only(tmp_path) -> None:
    model = _vit_like_attention()
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path, save_as_external_data=True, size_threshold=0)
    model = onnx.load(path)
    lazy = onnx.load(path, load_external_data=False)
    weights = [t for t in lazy.graph.initializer if t.name.startswith("w")]
    assert len(weights) == 3 and all(t.data_location == TensorProto.EXTERNAL for t in weights)
    assert count_macs(lazy, {"x": [2, 10, 8]}) == count_macs(model, {"x": [2, 10, 8]}) > 0
    assert count_params(lazy) == 3 * 64


def test_large_weight_without_data_is_never_read() -> None:
    # A 2**31-element weight whose data is absent: serialising it would exceed 2 GB and fail.
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[2**16, 2**15])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2**16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert count_macs(model, {"x": [4, 2**16]}) == 4 * 2**16 * 2**15
    assert count_params(model) == 2**31


def test_unknown_shape_is_skipped_with_warning(caplog) -> None:
    # NonZero's output length depends on data, so the second MatMul's operand stays unknown.
    model = _model(
        f"""{HEADER} g (float[4, 5] A, float[5, 6] B, float[7] z) => (float Y) {{
            H = MatMul(A, B)
            idx = NonZero(z)
            f = Cast<to = 1>(idx)
            Y = MatMul(f, H)
        }}"""
    )
    with caplog.at_level("WARNING", logger="lc_onnx.model.macs"):
        assert count_macs(model) == 4 * 5 * 6
    assert "unknown operand shapes" in caplog.text


def test_count_params_floats_only_including_constants() -> None:
    model = _model(
        f"""{HEADER} g (float[2, 3] x) => (float y)
        <float[3, 4] w = {{1,2,3,4,5,6,7,8,9,10,11,12}}, int64[2] s = {{4, 2}}> {{
            c = Constant<value = float[4] {{1, 2, 3, 4}}>()
            d = Constant<value_float = 2.0>()
            i = Constant<value = int64[3] {{1, 2, 3}}>()
            h = MatMul(x, w)
            y = Add(h, c)
        }}"""
    )
    assert count_params(model) == 12 + 4 + 1


@pytest.mark.parametrize(
    ("shapes", "message"),
    [({"nope": [1, 5]}, "'nope'"), ({"A": [1, 2, 5]}, "rank 2"), ({"A": [3, 5]}, "fixed dim 4")],
)
def test_bad_input_shapes_are_user_errors(shapes: dict, message: str) -> None:
    model = _model(f"{HEADER} g (float[4, 5] A, float[5, 6] B) => (float Y) {{ Y = MatMul(A, B) }}")
    with pytest.raises(UserError, match=message):
        count_macs(model, shapes)


def test_onnxruntime_attention_is_counted_and_shapes_flow_through_it():
    # com.microsoft Attention: QKV projection [16 -> 48] and both attention products of 5 tokens; the
    # MatMul after it is counted because its input shape is derived from the Attention's.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [
        helper.make_tensor("qkv", TensorProto.FLOAT, [16, 48], np.zeros(16 * 48).tolist()),
        helper.make_tensor("qkv_b", TensorProto.FLOAT, [48], np.zeros(48).tolist()),
        helper.make_tensor("w", TensorProto.FLOAT, [16, 8], np.zeros(128).tolist()),
    ]
    nodes = [
        helper.make_node("Attention", ["x", "qkv", "qkv_b"], ["a"], domain="com.microsoft", num_heads=2),
        helper.make_node("MatMul", ["a", "w"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "attn", [x], [y], inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    assert list(macs_by_node(model, {"x": (2, 5, 16)}).values()) == [
        2 * 5 * 16 * 48 + 2 * 5 * 5 * (16 + 16),
        2 * 5 * 16 * 8,
    ]


def test_shapes_computed_from_input_shapes_are_folded() -> None:
    # The dynamo export of a transformers encoder slices its position ids to the sequence length read
    # with Shape at run time; at concrete input shapes that length is known, and so is every MatMul.
    model = _model(
        f"""{HEADER} g (int64[B, S] ids) => (float Y)
           <int64[1, 512] pos = {{{", ".join(map(str, range(512)))}}}, float[512, 8] table = {{{", ".join(["0.5"] * 4096)}}},
            float[8, 16] w = {{{", ".join(["0.25"] * 128)}}}> {{
            seq = Shape<start = 1, end = 2>(ids)
            zero = Constant<value = int64[1] {{0}}>()
            one = Constant<value = int64[1] {{1}}>()
            p = Slice(pos, zero, seq, one, one)
            e = Gather(table, p)
            Y = MatMul(e, w)
        }}"""
    )
    assert count_macs(model, {"ids": [1, 128]}) == 128 * 8 * 16


def test_window_padding_computed_with_mod_is_folded() -> None:
    # Swin's torchscript export pads the tokens to a multiple of the window, `(w - n % w) % w`, computed
    # from Shape at run time: without Mod the padded shape, and every MatMul after it, stayed unknown.
    model = _model(
        f"""{HEADER} g (float[B, N, 8] x) => (float Y) <float[8, 16] w = {{{", ".join(["0.25"] * 128)}}}> {{
            n = Shape<start = 1, end = 2>(x)
            win = Constant<value = int64[1] {{4}}>()
            rest = Mod(n, win)
            short = Sub(win, rest)
            pad = Mod(short, win)
            before = Constant<value = int64[4] {{0, 0, 0, 0}}>()
            after = Constant<value = int64[1] {{0}}>()
            pads = Concat<axis = 0>(before, pad, after)
            padded = Pad(x, pads)
            Y = MatMul(padded, w)
        }}"""
    )
    assert count_macs(model, {"x": [2, 6, 8]}) == 2 * 8 * 8 * 16  # 6 tokens padded to 8
