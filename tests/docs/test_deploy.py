"""docs/deploy.md: its example commands run as written and write the repository it shows."""

from __future__ import annotations

import pytest

from lc_onnx.cli import main
from lc_onnx.model.demo import build_demo_model
from tests.deploy import helpers
from tests.docs.markdown import commands, read, shell_blocks

pytest.importorskip("tritonclient")
pytest.importorskip("onnxruntime")


def test_deploy_example_runs(tmp_path, monkeypatch):
    lines = commands(shell_blocks(read("docs/deploy.md"))[0])
    assert lines and all(argv[0] == "lc-onnx" for argv in lines)
    monkeypatch.chdir(tmp_path)
    for argv in lines:
        assert main(argv[1:]) == 0, argv
    model_dir = tmp_path / "models" / "demo"
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "1", "2", "config.pbtxt", "fuse_report_v1.json", "fuse_report_v2.json",
    ]  # fmt: skip
    helpers.assert_config_matches_graph(helpers.parse_config(model_dir / "config.pbtxt"), build_demo_model())
