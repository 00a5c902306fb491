"""`lc-onnx deploy` end to end through the CLI entry point."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.parser
import pytest

from lc_onnx.cli import main
from tests.deploy import helpers

pytest.importorskip("tritonclient")
pytest.importorskip("onnxruntime")


@pytest.fixture
def static_model(tmp_path):
    path = tmp_path / "static.onnx"
    onnx.save(
        onnx.parser.parse_model(helpers.HEADER + "g (float[1,4] x) => (float[1,4] y) { y = Relu(x) }"), path
    )
    return path


def test_batch_size_on_a_graph_without_batch_dim_is_a_one_line_error(tmp_path, static_model, capsys):
    before = static_model.read_bytes()
    code = main(["deploy", str(static_model), "--repo", str(tmp_path / "repo"), "--max-batch-size", "8"])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("lc-onnx deploy: error: --max-batch-size 8 needs a leading dynamic batch dimension")
    assert "'x' has shape [1, 4]" in err
    assert out == ""
    assert not (tmp_path / "repo").exists()
    assert static_model.read_bytes() == before


def test_static_graph_deploys_with_full_dims_by_default(tmp_path, static_model, capsys):
    assert main(["deploy", str(static_model), "--repo", str(tmp_path / "repo")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'repo' / 'static' / '1'}"
    config = helpers.parse_config(tmp_path / "repo" / "static" / "config.pbtxt")
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [1, 4]
    helpers.assert_config_matches_graph(config, onnx.load(static_model))


def test_every_flag_reaches_the_config(tmp_path, demo_model):
    repo = tmp_path / "repo"
    argv = [
        "deploy", str(demo_model), "--repo", str(repo), "--name", "svc", "--version", "3",
        "--max-batch-size", "16", "--instance-kind", "gpu", "--instances", "2", "--dynamic-batching",
        "--accelerator", "tensorrt",
    ]  # fmt: skip
    assert main(argv) == 0
    config = helpers.parse_config(repo / "svc" / "config.pbtxt")
    schema = helpers.model_config_pb2()
    assert config.name == "svc"
    assert config.max_batch_size == 16
    assert [(g.kind, g.count) for g in config.instance_group] == [(schema.ModelInstanceGroup.KIND_GPU, 2)]
    assert config.HasField("dynamic_batching")
    assert [a.name for a in config.optimization.execution_accelerators.gpu_execution_accelerator] == [
        "tensorrt"
    ]
    assert (repo / "svc" / "3" / "model.onnx").is_file()
    helpers.assert_config_matches_graph(config, onnx.load(demo_model))


def test_report_file_is_recorded_beside_the_config(tmp_path, demo_model):
    fused, report = tmp_path / "demo.collapsed.onnx", tmp_path / "report.json"
    assert main(["fuse", str(demo_model), "-o", str(fused), "--report", str(report)]) == 0
    repo = tmp_path / "repo"
    assert main(["deploy", str(fused), "--repo", str(repo), "--name", "demo", "--report", str(report)]) == 0
    assert json.loads((repo / "demo" / "fuse_report_v1.json").read_text()) == json.loads(report.read_text())
    feeds = {"tokens": np.random.default_rng(0).standard_normal((2, 16, 32)).astype(np.float32)}
    served, direct = helpers.run_ort(repo / "demo" / "1" / "model.onnx", feeds), helpers.run_ort(fused, feeds)
    np.testing.assert_array_equal(served[0], direct[0])


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file"), ("{not json", "not a readable JSON report"), ("[1, 2]", "is a JSON object")],
)
def test_bad_report_files_are_user_errors(tmp_path, demo_model, capsys, content, message):
    report = tmp_path / "r.json"
    if content is not None:
        report.write_text(content)
    code = main(["deploy", str(demo_model), "--repo", str(tmp_path / "repo"), "--report", str(report)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "repo").exists()


def test_existing_version_without_force_exits_2(tmp_path, demo_model, capsys):
    repo = tmp_path / "repo"
    assert main(["deploy", str(demo_model), "--repo", str(repo)]) == 0
    assert main(["deploy", str(demo_model), "--repo", str(repo), "--version", "1"]) == 2
    assert "version 1 already exists; pass --force" in capsys.readouterr().err
    assert main(["deploy", str(demo_model), "--repo", str(repo), "--version", "1", "--force"]) == 0
    assert main(["deploy", str(demo_model), "--repo", str(repo)]) == 0
    assert sorted(p.name for p in (repo / "demo").iterdir()) == ["1", "2", "config.pbtxt"]


def test_unreadable_model_is_a_user_error(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    assert main(["deploy", str(bad), "--repo", str(tmp_path / "repo")]) == 2
    assert capsys.readouterr().err.startswith("lc-onnx deploy: error: ")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("command", ["deploy", "fuse"])
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--instances", "2"],
            "{config} differs from the config for this model (instance_group[0].count: 1, would be 2); "
            "Triton uses one config for all versions: pass --force to replace it or use another --name",
        ),
        (["--version", "1"], "{version_dir}: version 1 already exists; pass --force to replace it"),
        (
            ["--dynamic-batching", "--max-batch-size", "0"],
            "--dynamic-batching needs --max-batch-size above 0 (Triton batches along dim 0)",
        ),
        (
            ["--accelerator", "cuda", "--instance-kind", "cpu"],
            "--accelerator cuda runs on GPU instances; use --instance-kind gpu",
        ),
        (
            ["--name", ".x"],
            "model name '.x' is not usable as a Triton model directory; pass --name with letters, digits, "
            "'_', '-' or '.' (not starting with '.' or '-')",
        ),
    ],
)
def test_library_errors_name_the_flags_of_either_command(
    tmp_path, demo_model, capsys, command, flags, message
):
    repo = tmp_path / "repo"
    assert main(["deploy", str(demo_model), "--repo", str(repo)]) == 0
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    if command == "deploy":
        argv = ["deploy", str(demo_model), "--repo", str(repo)]
    else:
        argv = ["fuse", str(demo_model), "-o", str(tmp_path / "out.onnx"), "--triton-repo", str(repo)]
    assert main([*argv, *flags]) == 2
    expected = message.format(config=repo / "demo" / "config.pbtxt", version_dir=repo / "demo" / "1")
    assert capsys.readouterr().err == f"lc-onnx {command}: error: {expected}\n"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
