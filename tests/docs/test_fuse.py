"""docs/fuse.md: its example commands run as written."""

from __future__ import annotations

import os

from lc_onnx import cli
from tests.docs.markdown import commands, read, shell_blocks


def test_fuse_examples_run(tmp_path, monkeypatch):
    lines = commands(shell_blocks(read("docs/fuse.md"))[0])
    assert lines and all(argv[0] == "lc-onnx" for argv in lines)
    monkeypatch.chdir(tmp_path)
    for argv in lines:
        assert cli.main(argv[1:]) == 0, argv
    assert {"demo.collapsed.onnx", "report.json", "strict.onnx"} <= set(os.listdir(tmp_path))
