"""Build the embedded demo model (a small token MLP network with near-linear PReLU activations, a
GELU block and a PRelu -> BatchNorm classifier head), fuse it, verify it in onnxruntime and print the
summary (as `fuse` does; --json prints the JSON report instead, for scripts). Writes demo.onnx,
demo.collapsed.onnx and report.json into --out (default: a new temporary directory).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lc_onnx.model import files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="directory for the demo files (default: a new temp dir)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the demo weights")
    parser.add_argument("--json", action="store_true", help="print the JSON report (and nothing else)")


def run(args: argparse.Namespace) -> int:
    from lc_onnx.api import fuse
    from lc_onnx.errors import UserError
    from lc_onnx.graph.report import summary
    from lc_onnx.model import io
    from lc_onnx.model.demo import build_demo_model

    out = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="lc-onnx-demo-"))
    if not out.is_dir():
        raise UserError(f"--out {out}: not an existing directory")
    original = io.save_model(build_demo_model(args.seed), out / "demo.onnx")
    result = fuse(original, output=out / "demo.collapsed.onnx")
    report_path = out / "report.json"
    files.write_text(report_path, result.report.to_json() + "\n")
    if args.json:
        print(result.report.to_json())
        return 0
    print(summary(result.report))
    print(f"wrote {original}, {result.path} and {report_path}")
    return 0
