"""Options and helpers shared by the commands that fuse (`fuse`, `inspect`, `demo`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from lc_onnx.errors import UserError


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same directory."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{path}: directory {parent} does not exist")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise UserError(f"{path}: cannot write ({exc.strerror})") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
