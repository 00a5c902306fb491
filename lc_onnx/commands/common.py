"""Options and helpers shared by the commands that fuse (`fuse`, `inspect`, `demo`, `calibrate`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from lc_onnx.calibration.text import DEFAULT_MAX_LENGTH
from lc_onnx.errors import UserError
from lc_onnx.graph.options import DEFAULT_MAX_ERROR, DEFAULT_THRESHOLD

# How these commands spell the library's parameters where it is not `--name-with-dashes`.
FLAGS = {"input_shapes": "--input-shape", "spec": "--data"}


def add_fuse_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threshold", type=float, default=DEFAULT_THRESHOLD,
        help="PRelu/LeakyRelu slopes within this distance of 1 count as linear (default %(default)g)",
    )  # fmt: skip
    parser.add_argument(
        "--max-error", type=float, metavar="E",
        help=f"largest allowed relative L2 error of any output (default {DEFAULT_MAX_ERROR:g}; with --blocks "
        "only when given)",
    )  # fmt: skip
    parser.add_argument(
        "--max-abs-error", type=float, metavar="A",
        help="also a largest allowed absolute error of any output element (default: no limit)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-growth", action="store_true", help="collapse even when it adds parameters (bottlenecks)"
    )
    parser.add_argument(
        "--input-shape", action="append", default=[], metavar="NAME:DxD...",
        help="concrete input shape for verification and MAC counts, e.g. x:1x3x224x224 (repeatable)",
    )  # fmt: skip


def parse_input_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse `name:1x3x224x224` specs (as given to `--input-shape`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
            if any(d < 0 for d in shape):
                raise ValueError
        except ValueError:
            raise UserError(
                f"--input-shape {spec!r}: expected NAME:DxDx... (for example x:1x3x224x224)"
            ) from None
        shapes[name] = shape
    return shapes


def fuse_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The pass's options as given; `max_error` and `max_abs_error` only when given (so the library
    knows whether a budget was asked for)."""
    kwargs = {
        "threshold": args.threshold,
        "allow_growth": args.allow_growth,
        "input_shapes": parse_input_shapes(args.input_shape) or None,
    }
    for name in ("max_error", "max_abs_error"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def add_calibration_options(parser: argparse.ArgumentParser) -> None:
    """`--data`, `--fits`, `--metric`, `--max-drop`, `--calib-batches` (see `lc_onnx.calibration`)."""
    group = parser.add_argument_group("calibration (replaces the --threshold rule by fits measured on data)")
    group.add_argument(
        "--data", metavar="SPEC",
        help="calibration data: FILE.py:FUNCTION (returns an iterable of {input: array}), DIR of .npz, "
        "FILE.npz or text:FILE (one example per line, with --tokenizer); fits every activation and collapses "
        "the sites that keep the outputs within --max-error on held-out feeds",
    )  # fmt: skip
    add_text_options(group)
    group.add_argument(
        "--fit-method", choices=("block", "channel"),
        help="block (the default with --data): each Linear -> activation -> Linear replaced by its "
        "least-squares linear map, fitted in order on the data; channel (the default with --fits): each "
        "activation replaced by a per-channel line",
    )  # fmt: skip
    group.add_argument(
        "--blocks", type=int, metavar="K",
        help="with the block fit: replace exactly K blocks, the best by held-out error (--max-error then "
        "applies only when given)",
    )  # fmt: skip
    group.add_argument("--fits", metavar="FITS.json", help="reuse the fits of `lc-onnx calibrate`")
    group.add_argument(
        "--metric", metavar="FILE.py:FUNCTION",
        help="metric(run) -> float, higher is better (run(feed) returns the outputs); with --max-drop",
    )  # fmt: skip
    group.add_argument("--max-drop", type=float, metavar="D", help="largest allowed metric drop")
    group.add_argument(
        "--calib-batches", type=int, metavar="N",
        help="fit on the first N feeds, hold out the next ones (default: every 4th feed is held out)",
    )  # fmt: skip


def add_text_options(parser) -> None:
    """`--tokenizer`, `--max-length`: how `--data text:FILE` becomes feeds."""
    parser.add_argument(
        "--tokenizer", metavar="DIR",
        help="with --data text:FILE: the model's tokenizer (a transformers tokenizer directory, read offline); "
        "each model input takes the tokenizer output of its name; every line whose CRC-32 is divisible by 10 "
        "is held out",
    )  # fmt: skip
    parser.add_argument(
        "--max-length", type=int, default=DEFAULT_MAX_LENGTH, metavar="N",
        help="with --data text:FILE: tokens per example at most (default %(default)d; batches of 32 lines)",
    )  # fmt: skip


def data_from_args(args: argparse.Namespace) -> Any:
    """`--data` (with `--tokenizer` and `--max-length` for text) as the data the library takes."""
    from lc_onnx.calibration.data import from_spec

    return from_spec(args.data, tokenizer=args.tokenizer, max_length=args.max_length)


def calibration_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from lc_onnx.calibration.data import load_callable

    kwargs: dict[str, Any] = {}
    if args.data is not None:
        kwargs["data"] = data_from_args(args)
    elif args.tokenizer is not None:
        raise UserError("--tokenizer applies to text data only (--data text:FILE)")
    if args.fits is not None:
        kwargs["fits"] = args.fits
    if args.metric is not None:
        kwargs["metric"] = load_callable(args.metric, "metric")
    if args.max_drop is not None:
        kwargs["max_drop"] = args.max_drop
    if args.calib_batches is not None:
        kwargs["calib_batches"] = args.calib_batches
    for name in ("fit_method", "blocks"):
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    if kwargs and not ({"data", "fits"} & kwargs.keys()):
        raise UserError(
            "--metric, --max-drop, --calib-batches, --fit-method and --blocks need --data (or --fits)"
        )
    if "data" in kwargs:
        kwargs["progress"] = not getattr(args, "no_progress", False)
    return kwargs
