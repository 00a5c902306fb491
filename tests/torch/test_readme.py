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


def _models_section() -> str:
    return README[README.index("<!-- section:models -->") : README.index("<!-- /section:models -->")]


def test_readme_supported_models_table_is_the_matrix():
    pytest.importorskip("transformers")
    from tests.torch.families import table

    assert table() in _models_section()


def test_readme_transformers_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    blocks = re.findall(r"^```python\n(.*?)^```", _models_section(), re.M | re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(blocks[0], "README.md:models", "exec"), namespace)  # noqa: S102 - our own README
    layers = [f"bert.encoder.layer.{i}.intermediate" for i in range(2)]
    assert namespace["names"] == [f"{p}.intermediate_act_fn" for p in layers] + ["bert.pooler.activation"]
    assert capsys.readouterr().out == "[]\n"  # the refusals it prints
    assert all(abs(s.item() - 1) <= 0.05 for s in namespace["slopes"])
    result = namespace["result"]
    assert result.collapsed == 3
    assert result.report.verification.worst_rel_l2 <= 0.05
    assert (tmp_path / "bert.onnx").exists() and (tmp_path / "bert.collapsed.onnx").exists()
    assert namespace["linears"] == ["bert.pooler.dense", *(f"{p}.dense" for p in reversed(layers))]


def test_readme_hf_config_finetune_command_runs(tmp_path, monkeypatch, capsys):
    """The first command of the section's shell block, as written (the second needs the Hub)."""
    pytest.importorskip("transformers")
    pytest.importorskip("sklearn")
    import shlex

    from lc_onnx.cli import main

    block = re.findall(r"^```bash\n(.*?)^```", _models_section(), re.M | re.S)[0]
    first = block.replace("\\\n", " ").splitlines()[0]
    assert first.startswith("lc-onnx finetune --model hf-config:vit ")
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(first)[1:] + ["--no-progress"]) == 0
    assert "runs/hf-vit: 2/2 MLP blocks collapsed" in capsys.readouterr().out
