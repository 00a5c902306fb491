"""The README: short, its set-up blocks are what CI runs, and its commands run as written."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest

from lc_onnx import cli
from tests.docs.markdown import README, ROOT, commands, read, shell_blocks

MAX_LINES = 200
SET_UP = [
    'pip install ".[cpu]" && lc-onnx demo\n',
    'pip install -e ".[cpu,torch,dev]" && pip install --no-deps nvidia-pytriton==0.7.0 && python -m pytest -q\n',
]


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= MAX_LINES


def test_readme_set_up_blocks_are_what_ci_runs():
    blocks = shell_blocks(README.read_text())
    assert blocks[0].strip() == 'pip install ".[cpu]" && lc-onnx demo'
    assert blocks[1].strip().startswith('pip install -e ".[cpu,torch,dev]" && ')
    assert blocks[1].strip().endswith(" && python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_blocks.py README.md 0" in ci and "readme_blocks.py README.md 1" in ci


@pytest.mark.parametrize("index", [0, 1])
def test_readme_blocks_script_prints_the_set_up_commands(index):
    """What `.ci/run` runs: `tools/readme_blocks.py README.md N`, as a script, byte for byte."""
    printed = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "readme_blocks.py"), "README.md", str(index)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert printed == SET_UP[index]


def _usage_blocks() -> list[str]:
    """The README's shell blocks after the two set-up blocks: fuse, calibrate, finetune."""
    blocks = shell_blocks(read("README.md"))[2:]
    assert len(blocks) == 3
    return blocks


def test_readme_fuse_and_calibration_commands_run(tmp_path, monkeypatch):
    fuse, calibrate, _ = _usage_blocks()
    lines = commands(fuse) + commands(calibrate)
    assert [argv[:2] for argv in lines] == [
        ["lc-onnx", "demo"], ["lc-onnx", "inspect"], ["lc-onnx", "fuse"], ["lc-onnx", "fuse"], ["lc-onnx", "calibrate"],
    ]  # fmt: skip
    (tmp_path / "calibration").symlink_to(ROOT / "calibration")
    monkeypatch.chdir(tmp_path)
    for argv in lines:
        assert cli.main(argv[1:]) == 0, argv
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["params_after"] < report["params_before"]
    assert {"demo.collapsed.onnx", "fits.json", "calibrated.onnx"} <= {p.name for p in tmp_path.iterdir()}
    # --blocks 2: both fitted blocks replaced, every MLP gone
    ops = {node.op_type for node in onnx.load(tmp_path / "calibrated.onnx").graph.node}
    assert not ops & {"Gelu", "Erf", "PRelu"}, ops


def test_readme_finetune_command_runs(tmp_path, monkeypatch, capsys):
    """The finetune block as written, with 4 epochs instead of 20 (half of the six blocks still collapse)."""
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    pytest.importorskip("sklearn")
    (argv,) = commands(_usage_blocks()[2])
    assert argv[:2] == ["lc-onnx", "finetune"] and "--epochs" in argv
    monkeypatch.chdir(tmp_path)
    assert cli.main([*argv[1:], "--epochs", "4", "--no-progress"]) == 0
    assert "runs/digits: 3/6 MLP blocks collapsed" in capsys.readouterr().out
    out = tmp_path / "runs" / "digits"
    assert {"model.onnx", "model.collapsed.onnx", "report.json", "metrics.jsonl", "checkpoint.pt"} <= {
        p.name for p in out.iterdir()
    }
