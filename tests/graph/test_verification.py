"""The verification gate is never vacuous: inputs that exercise the model, each collapsed site checked on
its own, outputs that saturate, models whose outputs do not depend on their inputs, and MAC counts that
say what they could not count."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import lc_onnx
from lc_onnx.cli import main
from lc_onnx.errors import VerificationError
from lc_onnx.graph import rewrite
from lc_onnx.model import exercise, runtime
from lc_onnx.testing import GraphBuilder, ort_outputs, rel_l2


def token_mlp(tail=None) -> onnx.ModelProto:
    """x [N, T, 16] -> MatMul+Add -> PRelu(1) -> MatMul+Add (an exact site), then `tail(g, y)`."""
    g = GraphBuilder()
    x = g.input("x", ["N", "T", 16])
    h = g.prelu(g.matmul(x, 16, 64, name="fc1"), 1.0, name="act")
    y = g.matmul(h, 64, 8, name="fc2")
    g.output(tail(g, y) if tail is not None else y, ["N", "T", 8])
    return g.model()


def image_mlp() -> onnx.ModelProto:
    """x [N, 3, H, W] -> a strided 3x3 conv -> a 1x1-conv MLP with PRelu(1) (an exact site)."""
    g = GraphBuilder()
    x = g.input("x", ["N", 3, "H", "W"])
    w = g.init("stem.weight", g.random((8, 3, 3, 3), 0.3))
    stem = g.node("Conv", [x, w], name="stem", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    h = g.prelu(g.conv1x1(stem, 8, 32, name="fc1"), 1.0, name="act")
    g.output(g.conv1x1(h, 32, 8, name="fc2"), ["N", 8, "h", "w"])
    return g.model()


def test_images_are_verified_at_224_and_sequences_at_32_with_a_batch_of_2():
    image = lc_onnx.fuse(image_mlp()).report
    assert image.verification.feed_shapes == {"x": [2, 3, 224, 224]}
    assert image.verification.feeds == 2
    # MACs are counted at the same shapes: the stem and the two 1x1 layers (then one) on 112x112.
    stem = 2 * 112 * 112 * 8 * 3 * 9
    assert (image.macs_before, image.macs_after) == (
        stem + 2 * 112 * 112 * (8 * 32 + 32 * 8),
        stem + 2 * 112 * 112 * 8 * 8,
    )
    tokens = lc_onnx.fuse(token_mlp()).report
    assert tokens.verification.feed_shapes == {"x": [2, 32, 16]}


def test_the_image_side_grows_to_the_product_of_the_strides():
    g = GraphBuilder()
    x = g.input("x", ["N", 3, "H", "W"])
    for i in range(9):  # 2**9 = 512 > 224
        x = g.node("MaxPool", [x], name=f"pool{i}", kernel_shape=[1, 1], strides=[2, 2])
    g.output(x, ["N", 3, "h", "w"])
    assert exercise.image_side(g.model()) == 512
    assert runtime.input_shapes(g.model(), exercise=True) == {"x": (2, 3, 512, 512)}


def test_token_ids_are_drawn_from_the_rows_of_the_table_they_index_and_masks_are_ones():
    g = GraphBuilder()
    ids = g.input("input_ids", ["N", "T"], onnx.TensorProto.INT64)
    mask = g.input("attention_mask", ["N", "T"], onnx.TensorProto.INT64)
    types = g.input("token_type_ids", ["N", "T"], onnx.TensorProto.INT64)
    words = g.node("Gather", [g.init("words", g.random((50, 16))), g.node("Cast", [ids], to=7)])
    kinds = g.node("Gather", [g.init("kinds", g.random((2, 16))), types])
    scaled = g.node(
        "Mul",
        [
            g.node("Add", [words, kinds]),
            g.node("Unsqueeze", [g.node("Cast", [mask], to=1), g.init("axis", np.array([-1]), np.int64)]),
        ],
    )
    g.output(scaled, ["N", "T", 16])
    model = g.model()
    assert exercise.index_rows(model) == {"input_ids": 50, "token_type_ids": 2}
    shapes = runtime.input_shapes(model, exercise=True)
    assert shapes == {"input_ids": (2, 32), "attention_mask": (2, 32), "token_type_ids": (2, 32)}
    feeds = runtime.random_feeds(model, shapes, seed=0, index_rows=exercise.index_rows(model))
    assert (
        feeds["input_ids"].min() >= 0
        and feeds["input_ids"].max() < 50
        and len(np.unique(feeds["input_ids"])) > 10
    )
    assert set(np.unique(feeds["token_type_ids"])) == {0, 1}
    assert (feeds["attention_mask"] == 1).all()


def test_a_model_that_cannot_run_at_the_exercising_shapes_falls_back_with_a_warning():
    g = GraphBuilder()
    x = g.input("x", ["N", "K"])
    square = g.node("Reshape", [x, g.init("shape", np.array([2, 2]), np.int64)])  # only 4 elements fit
    h = g.prelu(g.gemm(square, 2, 8, name="fc1"), 1.0, name="act")
    g.output(g.gemm(h, 8, 3, name="fc2"), [2, 3])
    report = lc_onnx.fuse(g.model()).report
    assert report.collapsed and report.verification.feed_shapes == {"x": [2, 2]}
    assert len(report.warnings) == 1 and "does not run at x[2,32]" in report.warnings[0]
    assert (report.macs_before, report.macs_after) == (2 * (2 * 8 + 8 * 3), 2 * 2 * 3)


def saturating(g, y):
    """A sigmoid far in its flat part: every output is exactly 1.0 in float32."""
    return g.node("Sigmoid", [g.node("Add", [y, g.init("shift", np.full(8, 40.0))])])


def test_a_wrong_rewrite_of_an_exact_site_fails_at_the_site_though_the_saturated_output_passes(
    tmp_path, monkeypatch
):
    model = token_mlp(saturating)
    emit = rewrite.Writer.emit

    def perturbed(writer, e):  # a rewrite bug: the collapsed weight 1 % off
        emit(writer, rewrite.Emission(e.kind, e.name, e.input, e.output, e.weight * 1.01, e.bias, e.spatial))

    monkeypatch.setattr(rewrite.Writer, "emit", perturbed)
    unchecked = lc_onnx.fuse(model, verify=False).model
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 32, 16)).astype(np.float32)}
    assert (
        rel_l2(ort_outputs(unchecked, feeds)[0], ort_outputs(model, feeds)[0]) == 0.0
    )  # the output alone passes

    out = tmp_path / "fused.onnx"
    with pytest.raises(
        VerificationError, match=r"exact collapse fc1 -> add1 differs .* own output 'add1_out'"
    ):
        lc_onnx.fuse(model, output=out)
    assert list(tmp_path.iterdir()) == []


def test_each_collapsed_site_reports_its_own_error():
    report = lc_onnx.fuse(token_mlp(saturating)).report
    (site,) = report.collapsed
    assert site.extra["site_error"]["tensor"] == "add1_out"  # the shift before the sigmoid folds into fc2
    assert 0 < site.extra["site_error"]["rel_l2"] <= 1e-6  # float rounding of an exact collapse
    assert (
        json.loads(report.to_json())["sites"][0]["site_error"]["rel_l2"] == site.extra["site_error"]["rel_l2"]
    )


def test_outputs_that_do_not_depend_on_the_inputs_get_a_warning(tmp_path, capsys):
    def constant(g, y):
        return g.node("Add", [g.node("Mul", [y, g.init("zero", np.zeros(8))]), g.init("c", np.arange(8.0))])

    path = tmp_path / "m.onnx"
    onnx.save(token_mlp(constant), path)
    assert (
        main(["fuse", str(path), "-o", str(tmp_path / "f.onnx"), "--report", str(tmp_path / "r.json")]) == 0
    )
    out = capsys.readouterr().out
    assert "warning: the original model's outputs do not depend on its inputs" in out
    (warning,) = json.loads((tmp_path / "r.json").read_text())["warnings"]
    assert "proves little" in warning


def test_an_exact_collapse_on_a_saturated_output_passes_on_rounding_with_a_warning():
    def tiny(g, y):  # values around 1e-30: the relative error is rounding, the absolute one nothing
        return g.node("Mul", [y, g.init("scale", np.full(8, 1e-30))])

    result = lc_onnx.fuse(token_mlp(tiny), max_error=1e-12)
    error = result.report.verification.outputs[result.model.graph.output[0].name]
    assert error.rel_l2 > 1e-12 and error.max_abs <= 1e-6
    (warning,) = result.report.warnings
    assert "passed on float rounding alone" in warning
    g = GraphBuilder()  # a near-linear collapse: its error is no rounding, whatever the scale
    h = g.prelu(g.gemm(g.input("x", ["N", 16]), 16, 64, name="fc1"), 0.97, name="act")
    g.output(g.gemm(h, 64, 8, name="fc2"), ["N", 8])
    with pytest.raises(VerificationError, match="relative L2 error"):
        lc_onnx.fuse(g.model(), max_error=1e-3)


def test_macs_that_cannot_be_counted_are_said_not_counted(capsys, tmp_path):
    g = GraphBuilder()
    x = g.input("x", ["N", 4])
    z = g.input("z", [7])
    idx = g.node("Cast", [g.node("NonZero", [z])], to=1)  # its length depends on the data
    y = g.node("MatMul", [idx, g.node("MatMul", [x, g.init("w", g.random((4, 6)))])])
    g.output(y, None)
    path = tmp_path / "m.onnx"
    onnx.save(g.model(), path)
    assert main(["fuse", str(path), "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["macs_not_counted"]["before"] == [y.removesuffix("_out")]
    assert "not counted: 1 matmul/conv node(s) of unknown shape" in capsys.readouterr().out
