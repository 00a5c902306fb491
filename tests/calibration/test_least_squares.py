"""The least-squares block fit through the calibrated fuse: an exactly linear block is recovered, padding
never enters a fit, memory does not grow with the data, in order against all on the original, and bad
input is one line with exit 2."""

from __future__ import annotations

import hashlib
import json
import tracemalloc

import numpy as np
import onnx
import pytest

import lc_onnx
from lc_onnx import cli
from lc_onnx.calibration import blockfit
from lc_onnx.calibration.select import Budget, Measurer
from lc_onnx.graph.algebra import Affine
from lc_onnx.graph.options import BlockFit
from lc_onnx.graph.verify import Side
from lc_onnx.model import io
from lc_onnx.testing import GraphBuilder, ort_outputs, rel_l2

D, H = 8, 32


def residual_block(g: GraphBuilder, x: str, name: str, act: str, positive: bool = False) -> str:
    """`x + fc2(act(fc1(x)))`; `positive`: fc1's weights and bias are positive (ReLU on positive x is
    then exactly linear)."""
    w1 = np.abs(g.random((D, H), 0.3)) if positive else g.random((D, H), 0.5)
    b1 = np.abs(g.random((H,), 0.1)) if positive else g.random((H,), 0.1)
    h = g.node("Add", [g.node("MatMul", [x, g.init(f"{name}.fc1.w", w1)]), g.init(f"{name}.fc1.b", b1)])
    h = g.node(act, [h], name=f"{name}.act")
    y = g.matmul(h, H, D, name=f"{name}.fc2")
    return g.node("Add", [x, y], name=f"{name}.residual")


def mlp_model(acts: list[str], positive: bool = False) -> onnx.ModelProto:
    g = GraphBuilder(seed=3)
    x = g.input("x", ["N", 4, D])
    for i, act in enumerate(acts):
        x = residual_block(g, x, f"b{i}", act, positive)
    g.output(g.node("Identity", [x], name="out"), ["N", 4, D])
    return g.model(opset=20)  # Gelu is an op from opset 20


def positive_feeds(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(0.1, 2.0, (8, 4, D)).astype(np.float32)} for _ in range(n)]


def normal_feeds(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(8, 4, D)).astype(np.float32)} for _ in range(n)]


def test_an_exactly_linear_block_is_recovered_to_float_precision():
    model = mlp_model(["Relu"], positive=True)
    result = lc_onnx.fuse(model, data=positive_feeds(8), blocks=1)
    (site,) = result.report.sites
    assert site.decision == "collapsed" and site.reason_kind == "least_squares"
    entry = site.extra["least_squares"]
    assert entry["rows"] == 6 * 8 * 4 and entry["held_out_rows"] == 2 * 8 * 4  # every 4th feed held out
    assert entry["held_out_error"] < 1e-5 and entry["order"] == 1
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add", "Add", "Identity"]
    fresh = positive_feeds(2, seed=9)[0]
    assert rel_l2(ort_outputs(result.model, fresh)[0], ort_outputs(model, fresh)[0]) < 1e-5


def token_model(mask_name: str) -> onnx.ModelProto:
    """ids -> embedding -> fc1 (positive) -> Relu -> fc2: real tokens (ids >= 1) embed positive, the
    padding id 0 negative, so the block is exactly linear on real tokens and not at padding."""
    g = GraphBuilder(seed=1)
    ids = g.input("input_ids", ["N", "T"], onnx.TensorProto.INT64)
    g.input(mask_name, ["N", "T"], onnx.TensorProto.INT64)  # unused by the graph, as HF masks often are
    table = np.abs(g.random((20, D))) + 0.1
    table[0] = -5.0
    x = g.node("Gather", [g.init("embedding", table), ids])
    h = g.node("Add", [g.node("MatMul", [x, g.init("fc1.w", np.abs(g.random((D, H), 0.3)))]),
                       g.init("fc1.b", np.zeros(H))])  # fmt: skip
    g.output(g.matmul(g.node("Relu", [h], name="act"), H, D, name="fc2"), ["N", "T", D])
    return g.model()


def token_feeds(mask_name: str, n: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(n):
        lengths = rng.integers(2, 10, size=4)
        mask = (np.arange(10)[None, :] < lengths[:, None]).astype(np.int64)
        ids = np.where(mask == 1, rng.integers(1, 20, size=(4, 10)), 0)
        feeds.append({"input_ids": ids, mask_name: mask})
    return feeds


def test_padding_never_enters_a_fit():
    masked = lc_onnx.fuse(token_model("attention_mask"), data=token_feeds("attention_mask"), blocks=1)
    entry = masked.report.sites[0].extra["least_squares"]
    real = sum(
        int(f["attention_mask"].sum()) for i, f in enumerate(token_feeds("attention_mask")) if i % 4 != 3
    )
    assert entry["rows"] == real < 6 * 4 * 10  # the real tokens of the fit feeds only
    assert entry["held_out_error"] < 1e-5  # linear on real tokens: exact
    # ... and verified where it is read: the real tokens (at padding the fused model differs).
    verification = masked.report.verification
    assert verification.padding_mask == "attention_mask" and verification.worst_rel_l2 < 1e-5
    feed = token_feeds("attention_mask")[3]
    fused, original = (ort_outputs(m, feed)[0] for m in (masked.model, token_model("attention_mask")))
    assert rel_l2(fused, original) > 1e-2  # the padding positions
    # The same data with the mask under a name that marks no padding: the padding rows change the fit.
    unmasked = lc_onnx.fuse(token_model("segment"), data=token_feeds("segment"), blocks=1)
    other = unmasked.report.sites[0].extra["least_squares"]
    assert other["rows"] == 6 * 4 * 10 and other["held_out_error"] > 1e-3


def test_the_sums_memory_does_not_grow_with_the_number_of_feeds():
    loaded = io.from_proto(mlp_model(["Gelu", "Gelu"]))
    found = blockfit.blocks(loaded)
    assert len(found) == 2

    def peak(n: int) -> tuple[int, int]:
        def stream():
            rng = np.random.default_rng(0)
            for _ in range(n):
                yield {"x": rng.normal(size=(1024, 4, D)).astype(np.float32)}

        tracemalloc.start()
        sums = blockfit.collect(Side(loaded.proto), None, found, stream(), [], None, lambda f, _: f)
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top, sums[found[0].key].fitted.n

    peak(1)  # the first session's one-off allocations
    (small, rows_small), (large, rows_large) = peak(5), peak(50)
    assert rows_large == 10 * rows_small == 10 * 5 * 1024 * 4
    assert large < 1.1 * small, (small, large)  # one feed's activations and the sums, whatever the data


def test_in_order_and_on_the_original_are_both_measured_and_the_better_is_used():
    model = mlp_model(["Gelu", "Gelu", "Gelu"])
    result = lc_onnx.fuse(model, data=normal_feeds(16), blocks=3)
    calibration = result.report.calibration
    scores = calibration["held_out_score"]
    assert set(scores) == {"original", "in order"}
    assert calibration["fitted_on"] == min(scores, key=lambda k: (scores[k], k != "in order"))
    assert calibration["blocks"] == 3 == result.collapsed
    assert sorted(s.extra["least_squares"]["order"] for s in result.report.sites) == [1, 2, 3]
    # The report's verification is the held-out feeds' outputs: the chosen way's score.
    assert result.report.verification.outputs["out_out"].rel_l2 == pytest.approx(
        scores[calibration["fitted_on"]], rel=1e-6
    )


def test_without_blocks_the_budget_chooses(tmp_path):
    model = mlp_model(["Gelu", "Relu"])
    tight = lc_onnx.fuse(model, data=normal_feeds(16), max_error=1e-6)
    assert tight.collapsed == 0 and all(s.reason_kind == "fit_rejected" for s in tight.report.sites)
    loose = lc_onnx.fuse(model, data=normal_feeds(16), max_error=10.0)
    assert loose.collapsed == 2


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--blocks", "3"], "--blocks 3: the model has 2 block(s) a least-squares fit can replace"),
        (["--blocks", "0"], "--blocks must be >= 1"),
        (["--fit-method", "block", "--fits", "FITS"], "--fits are per-channel fits: use them with --fit-method channel"),
        (["--fit-method", "channel", "--blocks", "1"], "--blocks must be >= 1 and goes with --fit-method block"),
    ],
)  # fmt: skip
def test_bad_block_options_are_one_line_and_exit_2(tmp_path, capsys, extra, message):
    model = tmp_path / "m.onnx"
    onnx.save(mlp_model(["Gelu", "Gelu"]), model)
    data = tmp_path / "data"
    data.mkdir()
    for i, feed in enumerate(normal_feeds(8)):
        np.savez(data / f"{i:02d}.npz", **feed)
    before = _digest(model)
    extra = [str(tmp_path / "fits.json") if a == "FITS" else a for a in extra]
    if "--fits" in extra:
        assert cli.main(["calibrate", str(model), "--data", str(data), "-o", extra[-1]]) == 0
        capsys.readouterr()
    out = tmp_path / "out.onnx"
    assert cli.main(["fuse", str(model), "--data", str(data), "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not out.exists() and _digest(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["m.onnx", "data", *(["fits.json"] if "--fits" in extra else [])]
    )


def test_the_cli_writes_the_report_of_the_block_fit(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(mlp_model(["Relu"], positive=True), model)
    data = tmp_path / "data"
    data.mkdir()
    for i, feed in enumerate(positive_feeds(8)):
        np.savez(data / f"{i:02d}.npz", **feed)
    argv = [
        "fuse",
        str(model),
        "--data",
        str(data),
        "--blocks",
        "1",
        "--no-progress",
        "--report",
        str(tmp_path / "r.json"),
    ]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert (
        report["calibration"]["fit_method"] == "block"
        and report["sites"][0]["reason_kind"] == "least_squares"
    )
    assert "replaced by its least-squares linear map" in capsys.readouterr().out


def test_a_candidate_run_from_its_first_block_measures_what_the_whole_model_does():
    loaded = io.from_proto(mlp_model(["Gelu", "Gelu", "Gelu"]))
    found = blockfit.blocks(loaded)
    held = normal_feeds(3, seed=5)
    measurer = Measurer(loaded, held, Budget(), False, starts=[b.input for b in found])
    assert set(measurer.starts) == {b.input for b in found[1:]}  # the first block reads the graph input
    fits = {b.key: BlockFit(b.input, Affine(np.eye(D) * 0.5, np.full(D, 0.1))) for b in found[1:]}
    whole, _, collapsed = measurer.measure({}, fits)
    part, _, same = measurer.measure({}, fits, start=found[1].input)
    assert collapsed == same and len(collapsed) > 0
    assert part.outputs["out_out"].rel_l2 == pytest.approx(whole.outputs["out_out"].rel_l2, rel=1e-6)
    assert whole.outputs["out_out"].rel_l2 > 0.01  # a real difference, measured alike both ways


def test_a_1x1_convolution_block_is_fitted_over_its_channel_axis():
    g = GraphBuilder(seed=4)
    x = g.input("x", ["N", D, 5, 5])
    w1 = np.abs(g.random((H, D, 1, 1), 0.3))
    h = g.node("Conv", [x, g.init("c1.w", w1), g.init("c1.b", np.abs(g.random((H,), 0.1)))], name="c1")
    y = g.conv1x1(g.node("Relu", [h], name="act"), H, D, name="c2")
    g.output(y, ["N", D, 5, 5])
    model = g.model()
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.uniform(0.1, 1.0, (2, D, 5, 5)).astype(np.float32)} for _ in range(8)]
    result = lc_onnx.fuse(model, data=feeds, blocks=1)
    entry = result.report.sites[0].extra["least_squares"]
    assert entry["rows"] == 6 * 2 * 25 and entry["held_out_error"] < 1e-5
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    fresh = {"x": rng.uniform(0.1, 1.0, (3, D, 5, 5)).astype(np.float32)}
    assert rel_l2(ort_outputs(result.model, fresh)[0], ort_outputs(model, fresh)[0]) < 1e-5


def test_a_gemm_block_keeps_its_kind():
    g = GraphBuilder(seed=5)
    x = g.input("x", ["N", D])
    y = g.gemm(g.node("Tanh", [g.gemm(x, D, H, name="fc1")], name="act"), H, 4, name="fc2")
    g.output(y, ["N", 4])
    model = g.model()
    rng = np.random.default_rng(0)
    feeds = [{"x": (0.1 * rng.normal(size=(16, D))).astype(np.float32)} for _ in range(8)]
    result = lc_onnx.fuse(model, data=feeds, blocks=1)
    assert [n.op_type for n in result.model.graph.node] == ["Gemm"]
    assert result.report.sites[0].reason_kind == "least_squares"
    # tanh is nearly linear at this scale: the fit is close, and onnxruntime measures it so
    assert 0 < result.report.verification.worst_rel_l2 < 0.01


@pytest.mark.parametrize(
    "feed, message",
    [
        ({"x": np.zeros((8, 4, D), np.float64)}, "input 'x' has dtype float64, the model expects float32"),
        ({"x": np.zeros((8, 5, D), np.float32)}, "input 'x' has shape 8x5x8, the model expects ?x4x8"),
        ({}, "input 'x' is missing"),
    ],
    ids=["dtype", "shape", "no-inputs"],
)
def test_bad_feeds_stop_the_block_fit_with_one_line_and_exit_2(tmp_path, capsys, feed, message):
    model = tmp_path / "m.onnx"
    onnx.save(mlp_model(["Gelu", "Gelu"]), model)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        np.savez(data / f"{i:02d}.npz", **feed)
    before = _digest(model)
    out = tmp_path / "out.onnx"
    assert cli.main(["fuse", str(model), "--data", str(data), "--blocks", "1", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not out.exists() and _digest(model) == before
    assert not [p for p in tmp_path.iterdir() if p.name not in {"m.onnx", "data"}]


@pytest.mark.parametrize("adder", ["Add", "SkipLayerNormalization"])
def test_the_residual_is_the_other_tensor_the_block_output_is_added_to(adder):
    g = GraphBuilder(seed=6)
    x = g.input("x", ["N", 4, D])
    y = g.matmul(g.node("Gelu", [g.matmul(x, D, H, name="fc1")], name="act"), H, D, name="fc2")
    if adder == "Add":
        out = g.node("Add", [y, x], name="residual")
    else:
        gamma, beta = g.init("gamma", np.ones(D)), g.init("beta", np.zeros(D))
        g.nodes.append(onnx.helper.make_node(
            "SkipLayerNormalization", [y, x, gamma, beta], ["sln_out"], name="sln", domain="com.microsoft"
        ))  # fmt: skip
        out = "sln_out"
    g.output(out, ["N", 4, D])
    model = g.model(opset=20)
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    (block,) = blockfit.blocks(io.from_proto(model))
    assert (block.input, block.key, block.residual) == ("x", y, "x")


def test_a_model_without_blocks_to_fit_is_fused_and_verified_on_the_held_out_feeds():
    g = GraphBuilder(seed=7)
    x = g.input("x", ["N", D])
    g.output(g.gemm(g.prelu(g.gemm(x, D, H), 1.0), H, 4), ["N", 4])  # slope 1: exactly linear
    feeds = [{"x": f["x"][:, 0]} for f in normal_feeds(8)]
    result = lc_onnx.fuse(g.model(), data=feeds)
    assert result.collapsed == 1 and result.report.sites[0].reason_kind == "exact"
    assert result.report.verification.feeds == 2  # every 4th of the 8 feeds
    assert result.report.calibration["candidates"] == 0 and result.report.calibration["blocks"] == 0
