"""docs/performance.md: its `lc-onnx bench` command runs as written (on the demo model and its fused
version instead of the ViT files, with 1 run)."""

from __future__ import annotations

import json
import math

from lc_onnx.cli import main
from tests.docs.markdown import commands, read, shell_blocks


def test_bench_command_runs(tmp_path, monkeypatch) -> None:
    lines = [argv for block in shell_blocks(read("docs/performance.md")) for argv in commands(block)]
    (argv,) = [argv for argv in lines if argv[:2] == ["lc-onnx", "bench"]]
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", "."]) == 0  # demo.onnx and demo.collapsed.onnx
    swap = {
        "out/models/vit_s16.onnx": "demo.onnx",
        "out/models/vit_s16.fused.onnx": "demo.collapsed.onnx",
        "out/models/vit_s16.oracle.onnx": "demo.collapsed.onnx",
    }
    assert set(swap) <= set(argv)
    argv = [swap.get(arg, arg) for arg in argv[1:]]
    assert main([*argv, "--runs", "1", "--warmup", "0", "--profile", "1", "--no-progress"]) == 0
    record = json.loads((tmp_path / "vit_s16.json").read_text())
    assert [run["batch"] for run in record["runs"]] == [1, 8]
    assert all(math.isfinite(run["oracle_speedup"]) for run in record["runs"])
    assert (tmp_path / "vit_s16.png").read_bytes()[:4] == b"\x89PNG"
