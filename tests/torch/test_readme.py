"""The README's `torch` section: its Python example runs as written and does what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _section_python_blocks() -> list[str]:
    section = README[README.index("<!-- section:torch -->") : README.index("<!-- /section:torch -->")]
    return re.findall(r"^```python\n(.*?)^```", section, re.M | re.S)


def test_readme_torch_example_runs(tmp_path, monkeypatch):
    blocks = _section_python_blocks()
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(blocks[0], "README.md:torch", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["names"] == ["blocks.2.mlp.act", "blocks.3.mlp.act"]
    assert all(abs(s.item() - 1) <= 0.05 for s in namespace["slopes"])
    result = namespace["result"]
    assert result.collapsed == 2
    assert result.report.params_after < result.report.params_before
    assert (tmp_path / "vit.onnx").exists() and (tmp_path / "vit.collapsed.onnx").exists()
    assert namespace["linears"] == ["blocks.3.mlp.fc1", "blocks.2.mlp.fc1"]
