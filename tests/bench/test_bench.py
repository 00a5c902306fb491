from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lc_onnx.bench import BenchConfig, Timing, run_bench
from lc_onnx.bench.profile import profile_op_times
from lc_onnx.cli import main
from lc_onnx.errors import UserError
from lc_onnx.model.files import umask

D, H = 16, 32


def _save(path: Path, nodes, weights: dict[str, np.ndarray], batch: str | int = "N", name: str = "x") -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, D])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """An MLP with PReLU(1) and its hand-collapsed single linear layer (same function)."""
    tmp = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((D, H)), rng.standard_normal(H)
    w2, b2 = rng.standard_normal((H, D)), rng.standard_normal(D)
    mlp = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("PRelu", ["hb", "slope"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["o"]),
        helper.make_node("Add", ["o", "b2"], ["y"]),
    ]

    def linear(name: str = "x") -> list[onnx.NodeProto]:
        return [helper.make_node("MatMul", [name, "w"], ["o"]), helper.make_node("Add", ["o", "b"], ["y"])]

    paths = {
        "a": _save(tmp / "a.onnx", mlp, {"w1": w1, "b1": b1, "slope": np.ones(1), "w2": w2, "b2": b2}),
        "b": _save(tmp / "b.onnx", linear(), {"w": w1 @ w2, "b": b1 @ w2 + b2}),
        "fixed": _save(tmp / "fixed.onnx", linear(), {"w": w1 @ w2, "b": b1 @ w2 + b2}, batch=1),
        "other_input": _save(tmp / "other.onnx", linear("z"), {"w": w1 @ w2, "b": b1 @ w2 + b2}, name="z"),
    }
    x = rng.standard_normal((3, D)).astype(np.float32)
    ya, yb = (ort.InferenceSession(paths[k]).run(None, {"x": x})[0] for k in "ab")
    np.testing.assert_allclose(ya, yb, rtol=1e-4, atol=1e-4)
    return paths


FAST = ["--runs", "3", "--warmup", "1", "--no-progress"]


def test_json_markdown_and_plot(models, tmp_path, capsys) -> None:
    out_json, out_md, out_png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    argv = ["bench", str(models["a"]), str(models["b"]), "--batch", "1,4", *FAST]
    code = main([*argv, "--json", str(out_json), "--markdown", str(out_md), "--plot", str(out_png)])
    assert code == 0
    record = json.loads(out_json.read_text())
    assert [run["batch"] for run in record["runs"]] == [1, 4]
    for run in record["runs"]:
        assert run["provider"] == "cpu"
        for key in ("a_ms_median", "b_ms_median", "a_ms_p90", "b_ms_p99", "speedup", "a_throughput"):
            assert math.isfinite(run[key]) and run[key] > 0, key
        assert run["a_ms_median"] <= run["a_ms_p90"] <= run["a_ms_p99"]
        assert math.isfinite(run["load_average_1m_start"]) and math.isfinite(run["load_average_1m_end"])
        # batch * (16*32 + 32*16) MACs against batch * 16*16
        assert run["a_macs"] == run["batch"] * 2 * D * H
        assert run["b_macs"] == run["batch"] * D * D
        assert run["ideal_speedup"] == pytest.approx(4.0)
        assert run["speedup"] == pytest.approx(run["a_ms_median"] / run["b_ms_median"])
        assert run["realized_over_ideal"] == pytest.approx(run["speedup"] / 4.0)
    table = out_md.read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| cpu | 1 |") and table[3].startswith("| cpu | 4 |")
    assert capsys.readouterr().out.strip().splitlines() == table
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Published with the permissions open() would give, not mkstemp's private 0600.
    for out in (out_json, out_md, out_png):
        assert out.stat().st_mode & 0o777 == 0o666 & ~umask(), out


def test_oracle_is_timed_in_the_same_rounds(models) -> None:
    calls = []
    config = BenchConfig(batches=(2,), runs=4, warmup=2)
    result = run_bench(models["a"], models["b"], config, oracle=models["b"], progress=calls.append)
    assert sum(calls) == 6
    (row,) = result.rows()
    assert len(result.runs[0].timings["c"].samples_ms) == 4
    assert row["oracle_ideal_speedup"] == pytest.approx(4.0)
    assert row["fused_over_oracle"] == pytest.approx(row["speedup"] / row["oracle_speedup"])
    assert "oracle speedup" in result.to_markdown().splitlines()[0]


def test_cuda_without_cuda_is_one_line_exit_2(models, capsys) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    # With the progress bar on: nothing but the error may reach stderr.
    code = main(["bench", str(models["a"]), str(models["b"]), "--provider", "cuda", "--runs", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("lc-onnx bench: error: CUDAExecutionProvider is not available")


@pytest.mark.parametrize(
    ("a", "b", "extra", "message"),
    [
        ("a", "missing", [], "missing.onnx: no such file"),
        ("a", "other_input", [], "different inputs"),
        ("a", "fixed", ["--batch", "8"], "fixed batch dim 1"),
        ("a", "b", ["--json", "/nonexistent/dir/r.json"], "output directory does not exist"),
    ],
)
def test_user_errors(models, capsys, tmp_path, a, b, extra, message) -> None:
    paths = {**models, "missing": tmp_path / "missing.onnx"}
    code = main(["bench", str(paths[a]), str(paths[b]), *FAST, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]


def test_not_an_onnx_file_is_a_user_error(models, tmp_path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\x00not a model")
    with pytest.raises(UserError, match="junk.onnx"):
        run_bench(models["a"], junk, BenchConfig(batches=(1,), runs=1, warmup=0))


def test_profile_separates_the_activation(models) -> None:
    feeds = {"x": np.ones((4, D), np.float32)}
    a = profile_op_times(models["a"], feeds, "cpu", threads=1, runs=3)
    b = profile_op_times(models["b"], feeds, "cpu", threads=1, runs=3)
    assert a["PRelu"] > 0 and "PRelu" not in b
    assert a["total"] > 0 and b["total"] > 0
    assert sum(v for k, v in a.items() if k != "total") <= a["total"] * 1.5


def test_timing_statistics() -> None:
    t = Timing.from_samples([float(v) for v in range(1, 101)], batch=8)
    assert t.ms_median == pytest.approx(50.5)
    assert t.ms_p90 == pytest.approx(90.1)
    assert t.ms_p99 == pytest.approx(99.01)
    assert t.throughput == pytest.approx(8 * 1000 / 50.5)


def test_input_shapes_set_the_sequence_and_attention_masks_are_ones(tmp_path) -> None:
    # A text model's inputs: token ids and an attention mask, batch and sequence symbolic.
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", "seq"])
    graph = helper.make_graph(
        [helper.make_node("Add", ["input_ids", "attention_mask"], ["y"])], "t", [ids, mask], [out]
    )
    path = tmp_path / "text.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    from lc_onnx.bench.runner import make_feeds, make_session

    session = make_session(path, "cpu", 1)
    feeds = make_feeds(session, 8, 0, {"input_ids": (1, 128), "attention_mask": (1, 128)})
    assert {k: v.shape for k, v in feeds.items()} == {"input_ids": (8, 128), "attention_mask": (8, 128)}
    assert feeds["attention_mask"].min() == 1 and feeds["input_ids"].max() == 0
    code = main(["bench", str(path), str(path), "--batch", "1", "--runs", "1", "--warmup", "0",
                 "--no-progress", "--input-shape", "nope:1x4"])  # fmt: skip
    assert code == 2
