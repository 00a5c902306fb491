"""Collapse Linear -> (near-)linear activation -> Linear into one linear layer, verified in onnxruntime.

Finds Gemm / MatMul(+Add) layers joined by Identity, Dropout, BatchNormalization or PRelu/LeakyRelu
whose slopes are within --threshold of 1, rewrites each chain as one layer, runs the original and the
fused model on the same inputs and writes the fused model only when every output's relative L2 error is
within --max-error.

Exit codes: 0 done (also when nothing qualified: the output is then the same graph), 1 verification
failed (nothing written), 2 bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lc_onnx.commands import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="the .onnx model to fuse")
    parser.add_argument("-o", "--output", type=Path, help="where to write (default MODEL.collapsed.onnx)")
    common.add_fuse_options(parser)
    parser.add_argument("--report", type=Path, metavar="R.json", help="write the JSON report here")
    parser.add_argument("--dry-run", action="store_true", help="fuse and verify but write no model")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the onnxruntime comparison (not recommended)"
    )


def run(args: argparse.Namespace) -> int:
    from lc_onnx.pipeline import fuse
    from lc_onnx.report import summary

    output = None if args.dry_run else (args.output or default_output(args.model))
    result = fuse(
        args.model,
        output=output,
        verify=not args.no_verify,
        **common.fuse_kwargs(args),
    )
    print(summary(result.report))
    if args.report is not None:
        common.write_text_atomic(args.report, result.report.to_json() + "\n")
    print(f"wrote {output}" if output is not None else "dry run: no model written")
    return 0


def default_output(model: Path) -> Path:
    """`model.onnx` -> `model.collapsed.onnx` beside it."""
    stem = model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.name
    return model.with_name(stem + ".collapsed.onnx")
