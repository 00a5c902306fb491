"""docs/pytorch.md: its Python example runs as written and does what its comments say."""

from __future__ import annotations

import pytest

from tests.docs.markdown import python_blocks, read

pytest.importorskip("torch")
pytest.importorskip("timm")


def test_pytorch_example_runs(tmp_path, monkeypatch):
    blocks = python_blocks(read("docs/pytorch.md"))
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_example"}
    exec(compile(blocks[0], "docs/pytorch.md", "exec"), namespace)  # noqa: S102 - our own docs
    assert namespace["names"] == ["blocks.2.mlp.act", "blocks.3.mlp.act"]
    assert all(abs(s.item() - 1) <= 0.05 for s in namespace["slopes"])
    result = namespace["result"]
    assert result.collapsed == 2
    assert result.report.params_after < result.report.params_before
    assert (tmp_path / "vit.onnx").exists() and (tmp_path / "vit.collapsed.onnx").exists()
    assert namespace["linears"] == ["blocks.3.mlp.fc1", "blocks.2.mlp.fc1"]
