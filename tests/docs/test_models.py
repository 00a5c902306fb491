"""docs/models.md: the supported-models table is the tested matrix, and its examples run as written."""

from __future__ import annotations

import pytest

from tests.docs.markdown import commands, python_blocks, read, shell_blocks

pytest.importorskip("torch")
pytest.importorskip("timm")

MODELS = "docs/models.md"


def test_supported_models_table_is_the_matrix():
    pytest.importorskip("transformers")
    from tests.torch.families import table

    assert table() in read(MODELS)


def test_transformers_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    blocks = python_blocks(read(MODELS))
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_example"}
    exec(compile(blocks[0], MODELS, "exec"), namespace)  # noqa: S102 - our own docs
    layers = [f"bert.encoder.layer.{i}.intermediate" for i in range(2)]
    assert namespace["names"] == [f"{p}.intermediate_act_fn" for p in layers] + ["bert.pooler.activation"]
    assert capsys.readouterr().out == "[]\n"  # the refusals it prints
    assert all(abs(s.item() - 1) <= 0.05 for s in namespace["slopes"])
    result = namespace["result"]
    assert result.collapsed == 3
    assert result.report.verification.worst_rel_l2 <= 0.05
    assert (tmp_path / "bert.onnx").exists() and (tmp_path / "bert.collapsed.onnx").exists()
    assert namespace["linears"] == ["bert.pooler.dense", *(f"{p}.dense" for p in reversed(layers))]


def test_hf_config_finetune_command_runs(tmp_path, monkeypatch, capsys):
    """The first command of the doc's shell block, as written (the second needs the Hub)."""
    pytest.importorskip("transformers")
    pytest.importorskip("sklearn")
    from lc_onnx.cli import main

    first = commands(shell_blocks(read(MODELS))[0])[0]
    assert first[:3] == ["lc-onnx", "finetune", "--model"] and first[3] == "hf-config:vit"
    monkeypatch.chdir(tmp_path)
    assert main(first[1:] + ["--no-progress"]) == 0
    assert "runs/hf-vit: 2/2 MLP blocks collapsed" in capsys.readouterr().out
