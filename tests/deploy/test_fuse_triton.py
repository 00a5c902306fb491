"""`lc-onnx fuse MODEL --triton-repo DIR`: fuse and deploy in one step."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.parser
import pytest

from lc_onnx.cli import main
from lc_onnx.model.demo import build_demo_model
from tests.deploy import helpers

pytest.importorskip("tritonclient")
pytest.importorskip("onnxruntime")


def test_fuse_writes_the_fused_model_as_a_new_version(tmp_path, demo_model):
    source = demo_model
    out, report, repo = tmp_path / "fused.onnx", tmp_path / "report.json", tmp_path / "repo"
    argv = ["fuse", str(source), "-o", str(out), "--report", str(report), "--triton-repo", str(repo)]
    assert main([*argv, "--dynamic-batching", "--instances", "2"]) == 0

    # Named after the input model, not the output file.
    config = helpers.parse_config(repo / "demo" / "config.pbtxt")
    assert (config.max_batch_size, config.instance_group[0].count) == (8, 2)
    assert config.HasField("dynamic_batching")
    served = repo / "demo" / "1" / "model.onnx"
    helpers.assert_config_matches_graph(config, onnx.load(served))
    assert (
        len(onnx.load(served).graph.node)
        == len(onnx.load(out).graph.node)
        < len(build_demo_model().graph.node)
    )
    feeds = {"tokens": np.random.default_rng(0).standard_normal((4, 16, 32)).astype(np.float32)}
    np.testing.assert_array_equal(helpers.run_ort(served, feeds)[0], helpers.run_ort(out, feeds)[0])
    assert json.loads((repo / "demo" / "fuse_report_v1.json").read_text()) == json.loads(report.read_text())

    assert main([*argv, "--dynamic-batching", "--instances", "2"]) == 0
    assert sorted(p.name for p in (repo / "demo").iterdir()) == [
        "1", "2", "config.pbtxt", "fuse_report_v1.json", "fuse_report_v2.json",
    ]  # fmt: skip


def test_bad_triton_option_fails_before_anything_is_written(tmp_path, capsys):
    source = tmp_path / "static.onnx"
    text = '<ir_version: 8, opset_import: ["" : 17]>\ng (float[1,4] x) => (float[1,4] y) { y = Relu(x) }'
    onnx.save(onnx.parser.parse_model(text), source)
    out, repo = tmp_path / "out.onnx", tmp_path / "repo"
    argv = ["fuse", str(source), "-o", str(out), "--triton-repo", str(repo), "--max-batch-size", "8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lc-onnx fuse: error: --max-batch-size 8 needs a leading dynamic batch dimension")
    assert err.count("\n") == 1
    assert not out.exists() and not repo.exists()
