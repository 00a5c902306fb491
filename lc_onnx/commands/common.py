"""Options and helpers shared by the commands that fuse (`fuse`, `inspect`, `demo`)."""

from __future__ import annotations

import argparse
from typing import Any


def add_fuse_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threshold", type=float, default=0.05,
        help="PRelu/LeakyRelu slopes within this distance of 1 count as linear (default 0.05)",
    )  # fmt: skip
    parser.add_argument(
        "--max-error", type=float, default=1e-2,
        help="largest allowed relative L2 error of any output (default 1e-2)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-growth", action="store_true", help="collapse even when it adds parameters (bottlenecks)"
    )
    parser.add_argument(
        "--input-shape", action="append", default=[], metavar="NAME:DxD...",
        help="concrete input shape for verification and MAC counts, e.g. x:1x3x224x224 (repeatable)",
    )  # fmt: skip


def fuse_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from lc_onnx.runtime import parse_input_shapes

    return {
        "threshold": args.threshold,
        "max_error": args.max_error,
        "allow_growth": args.allow_growth,
        "input_shapes": parse_input_shapes(args.input_shape) or None,
    }
